"""The page's sections: verdict banner, run facts, rank table, histograms, waves, events."""

from __future__ import annotations

import math

from instrumented_core.diagnosis import verdict_matches
from instrumented_core.report.data import PendingSpan, RunData
from instrumented_core.report.svg import _fmt_seconds, bar_chart_svg
from instrumented_core.report.theme import (
    OUTCOME_COLORS,
    VERDICT_COLORS,
    esc,
    rank_color,
)
from instrumented_core.telemetry import names as n
from instrumented_core.telemetry.metrics import SYNC_WAIT_BUCKETS


def _last_rows(data: RunData) -> dict[int, dict]:
    """Each rank's last reachable row (counters) and its last row (state)."""
    last: dict[int, dict] = {}
    for row in data.timeline:
        if row.get("reachable"):
            last[int(row["rank"])] = row
    return last


def _empty(text: str) -> str:
    return f'<p class="empty">{esc(text)}</p>'


def _bucket_labels(bounds: list[float]) -> list[str]:
    """``≤ 5 ms`` per upper bound; the +Inf bucket reads ``> <last finite bound>``."""
    labels = []
    for i, bound in enumerate(bounds):
        if bound != math.inf:
            labels.append("≤ " + _fmt_seconds(bound))
        else:
            labels.append("> " + _fmt_seconds(bounds[i - 1]) if i else "all")
    return labels


def _wait_histograms(data: RunData) -> str:
    parts = []
    if data.prom_waits:
        bounds = sorted({le for b in data.prom_waits.values() for le, _ in b})
        ranks = sorted(data.prom_waits)
        values = []
        for i, le in enumerate(bounds):
            row = []
            for rank in ranks:
                cum = dict(data.prom_waits[rank])
                below = cum.get(bounds[i - 1], 0.0) if i else 0.0
                row.append(max(0.0, cum.get(le, below) - below))
            values.append(row)
        # drop empty leading/trailing buckets so the shape is readable
        used = [i for i, row in enumerate(values) if any(row)]
        if used:
            lo, hi = used[0], used[-1]
            groups = _bucket_labels(bounds)[lo:hi + 1]
            parts.append("<h3>From the ranks' final metrics (every sync round)</h3>")
            parts.append(bar_chart_svg(
                "sync-wait-metrics", "all-reduce wait distribution from metrics", groups,
                [(f"rank {r}", rank_color(r)) for r in ranks], values[lo:hi + 1],
                "sync rounds", stacked=True))
    samples = {r: v for r, v in sorted(data.sync_waits.items()) if v}
    if samples:
        bounds = list(SYNC_WAIT_BUCKETS) + [math.inf]
        ranks = sorted(samples)
        values = [[0.0] * len(ranks) for _ in bounds]
        for j, rank in enumerate(ranks):
            for w in samples[rank]:
                i = next(i for i, b in enumerate(bounds) if w <= b)
                values[i][j] += 1
        used = [i for i, row in enumerate(values) if any(row)]
        lo, hi = used[0], used[-1]
        groups = _bucket_labels(bounds)[lo:hi + 1]
        total = sum(len(v) for v in samples.values())
        parts.append(f"<h3>From the spans' <code>{esc(n.EVENT_SYNC_ROUND)}</code> events "
                     f"({total} sync rounds while a pause was pending)</h3>")
        parts.append(bar_chart_svg(
            "sync-wait-spans", "all-reduce wait distribution from spans", groups,
            [(f"rank {r}", rank_color(r)) for r in ranks], values[lo:hi + 1], "sync rounds",
            stacked=True, height=300))
    if not parts:
        return _empty("no all-reduce waits recorded (no metrics/rank-*.prom files and no "
                      f"{n.EVENT_SYNC_ROUND} span events)")
    if not data.prom_waits:
        parts.append('<p class="note">The ranks\' final metrics were not saved with this run '
                     "(no metrics/rank-*.prom): only the sync rounds inside pause spans are "
                     "shown.</p>")
    return "".join(parts)


def _latency_section(data: RunData) -> str:
    if not data.pending:
        return _empty(f"no {n.SPAN_PENDING} spans: no pause reached the pending phase")
    ordinals = sorted({p.ordinal for p in data.pending})
    ranks = sorted({p.rank for p in data.pending})
    by_key = {(p.ordinal, p.rank): p for p in data.pending}
    groups = [f"pause {o}" for o in ordinals]
    series = [(f"rank {r}", rank_color(r)) for r in ranks]
    secs = [[(by_key[(o, r)].seconds or 0.0) if (o, r) in by_key else 0.0 for r in ranks]
            for o in ordinals]
    steps = [[float(by_key[(o, r)].steps or 0) if (o, r) in by_key else 0.0 for r in ranks]
             for o in ordinals]
    parts = ["<h3>Seconds</h3>",
             bar_chart_svg("consensus-seconds", "pause request to consensus, seconds", groups,
                           series, [[v * 1e3 for v in row] for row in secs], "milliseconds",
                           value_fmt=lambda v: f"{v:.3g} ms", height=280),
             "<h3>Steps</h3>",
             bar_chart_svg("consensus-steps", "pause request to consensus, steps", groups,
                           series, steps, "engine steps", height=280)]
    rows = []
    for p in data.pending:
        rows.append(f"<tr><td>{esc(p.ordinal)}</td><td>{esc(p.rank)}</td>"
                    f"<td>{esc(p.mode or '-')}</td>"
                    f"<td>{esc(f'{p.start - data.t0:.2f}')}</td>"
                    f"<td>{esc(_fmt_seconds(p.seconds))}</td>"
                    f"<td>{esc(p.steps if p.steps is not None else '-')}</td></tr>")
    parts.append('<details><summary>values</summary><table class="data"><thead><tr>'
                 "<th>pause</th><th>rank</th><th>mode</th><th>requested at (s)</th>"
                 "<th>to consensus</th><th>steps</th></tr></thead><tbody>"
                 + "".join(rows) + "</tbody></table></details>")
    return "".join(parts)


def _waves_section(data: RunData) -> str:
    last = _last_rows(data)
    ranks = [r for r in data.ranks if r in last]
    if not ranks:
        totals = data.summary.get("start_dp_wave")
        if isinstance(totals, dict) and totals:
            return bar_chart_svg(
                "start-dp-wave", "START_DP_WAVE outcomes (all ranks)", ["all ranks"],
                [(o, OUTCOME_COLORS[o]) for o in n.WAVE_OUTCOMES],
                [[float(totals.get(o, 0) or 0) for o in n.WAVE_OUTCOMES]], "messages")
        return _empty("no per-rank START_DP_WAVE counts recorded")
    values = [[float((last[r].get("start_dp_wave") or {}).get(o, 0) or 0)
               for o in n.WAVE_OUTCOMES] for r in ranks]
    return bar_chart_svg("start-dp-wave", "START_DP_WAVE outcomes per rank",
                         [f"rank {r}" for r in ranks],
                         [(o, OUTCOME_COLORS[o]) for o in n.WAVE_OUTCOMES], values,
                         "START_DP_WAVE messages")


def _rank_table(data: RunData, culprits: set[int], victims: set[int]) -> str:
    last = _last_rows(data)
    final_state: dict[int, dict] = {}
    for row in data.timeline:
        final_state[int(row["rank"])] = row
    latencies: dict[int, list[PendingSpan]] = {}
    for p in data.pending:
        latencies.setdefault(p.rank, []).append(p)
    head = ("rank", "role", "final state", "wave", "steps real / dummy", "sync rounds",
            "inside (at the end)", "START_DP_WAVE acted / ignored / stale / excluded",
            "ignored (span events)", "pause requests / consensus", "pauses (spans)",
            "max to consensus", "mean all-reduce wait (metrics)")
    rows = []
    for rank in data.ranks:
        row = last.get(rank, {})
        end = final_state.get(rank, {})
        role = "culprit" if rank in culprits else "victim" if rank in victims else ""
        if not end:
            state = "no samples"
        elif not end.get("reachable"):
            state = "unreachable"
        else:
            state = end.get("phase") or "-"
        waves = row.get("start_dp_wave") or {}
        inside = (f"{end.get('inside')} {float(end.get('inside_seconds') or 0):.1f} s"
                  if end.get("reachable") and end.get("inside") else "-")
        spans = latencies.get(rank, [])
        worst = max((p.seconds or 0.0 for p in spans), default=None)
        worst_steps = max((p.steps or 0 for p in spans), default=None)
        sums = data.prom_wait_sums.get(rank)
        mean = _fmt_seconds(sums[0] / sums[1]) if sums and sums[1] else "-"
        cells = (
            rank, role, state, row.get("wave", "-"),
            f"{row.get('steps_real', '-')} / {row.get('steps_dummy', '-')}",
            row.get("sync_rounds", "-"), inside,
            " / ".join(str(waves.get(o, "-")) for o in n.WAVE_OUTCOMES),
            data.ignored_events.get(rank, 0),
            f"{row.get('pause_requests', '-')} / {row.get('consensus', '-')}",
            len(spans),
            f"{_fmt_seconds(worst)} ({worst_steps} steps)" if spans else "-",
            mean,
        )
        cls = ' class="culprit"' if rank in culprits else ""
        rows.append(f"<tr{cls}>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    if not rows:
        return _empty("no ranks recorded")
    return ('<table class="data" id="rank-table"><thead><tr>'
            + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def _banner(data: RunData, culprits: list[int], victims: list[int]) -> str:
    s = data.summary
    verdict = str(s.get("verdict") or "unknown")
    color = VERDICT_COLORS.get(verdict, "#455a64")
    expected = s.get("expected") if isinstance(s.get("expected"), dict) else {}
    exp_kind = expected.get("verdict")
    exp_culprits = expected.get("culprit_ranks") or []
    match = None
    if exp_kind:
        match = verdict_matches(verdict, culprits, exp_kind, exp_culprits)
    culprit_text = ", ".join(str(r) for r in culprits) or "none"
    victim_text = ", ".join(str(r) for r in victims) or "none"
    parts = [f'<section id="verdict" class="banner" style="border-color:{color}">',
             f'<div class="verdict-kind" style="background:{color}">{esc(verdict)}</div>',
             '<div class="verdict-body">',
             f'<p class="verdict-summary">{esc(s.get("summary") or "no verdict recorded")}</p>',
             f"<p><b>culprit ranks:</b> {esc(culprit_text)} &nbsp; "
             f"<b>victim ranks:</b> {esc(victim_text)}</p>"]
    if exp_kind:
        exp_text = exp_kind + (f" (ranks {', '.join(str(r) for r in exp_culprits)})"
                               if exp_culprits else "")
        badge = ('<span class="ok">as expected</span>' if match
                 else '<span class="bad">NOT as expected</span>')
        parts.append(f"<p><b>expected:</b> {esc(exp_text)} &nbsp; {badge}</p>")
    details = s.get("details") or []
    if isinstance(details, list) and details:
        parts.append("<ul>" + "".join(f"<li>{esc(d)}</li>" for d in details) + "</ul>")
    parts.append("</div></section>")
    return "".join(parts)


def _run_facts(data: RunData) -> str:
    s = data.summary
    facts = [("protocol", s.get("protocol")), ("cadence", s.get("cadence")),
             ("ranks", s.get("ranks") or len(data.ranks) or None),
             ("sync interval", s.get("sync_interval")), ("seed", s.get("seed")),
             ("fault", s.get("fault")), ("fault rank", s.get("fault_rank")),
             ("pauses", s.get("pauses")), ("duration", f"{s['duration_seconds']} s"
                                           if s.get("duration_seconds") is not None else None)]
    items = "".join(f"<span><b>{esc(k)}</b> {esc(v)}</span>" for k, v in facts if v is not None)
    urls = s.get("metrics_urls") or []
    url_text = ""
    if isinstance(urls, list) and urls:
        url_text = ('<p class="small">metrics were served at: '
                    + " ".join(f"<code>{esc(u or '-')}</code>" for u in urls) + "</p>")
    return f'<div class="facts">{items}</div>{url_text}'


def _events_list(data: RunData) -> str:
    if not data.events:
        return _empty("no story events recorded")
    items = []
    for i, e in enumerate(data.events, 1):
        items.append(f"<li><span class=\"num\">{i}</span> "
                     f"<span class=\"t\">{float(e['t']) - data.t0:6.2f} s</span> "
                     f"<span class=\"step\">{esc(e.get('step', ''))}</span> "
                     f"{esc(e.get('event', ''))}</li>")
    return '<ol class="events">' + "".join(items) + "</ol>"
