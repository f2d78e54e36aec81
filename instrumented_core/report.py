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
"""

from __future__ import annotations

import html
import json
import math
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from instrumented_core.recorder import EVENTS, TIMELINE
from instrumented_core.telemetry import names as n
from instrumented_core.telemetry.metrics import SYNC_WAIT_BUCKETS

REPORT = "report.html"
SUMMARY = "summary.json"  # the demo's SUMMARY (not imported: demo pulls in the whole cluster)
SPANS = "spans.jsonl"  # the demo's SPANS
METRICS_DIR = "metrics"  # final per-rank exposition text: metrics/rank-<r>.prom


STATES = ("running", "pending_pause", "paused", "unreachable")
STATE_COLORS = {"running": "#4caf50", "pending_pause": "#ffb300", "paused": "#42a5f5",
                "unreachable": "#e53935"}
OUTCOME_COLORS = {"acted": "#43a047", "ignored": "#fb8c00", "stale": "#9e9e9e",
                  "excluded": "#8e24aa"}
RANK_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
               "#7f7f7f", "#bcbd22", "#17becf")
VERDICT_COLORS = {"healthy": "#2e7d32", "pausing": "#1565c0", "paused": "#1565c0",
                  "slow": "#ef6c00", "stuck": "#c62828", "deadlock": "#6a1b9a",
                  "wedged": "#4e342e"}
HEALTHY_VERDICTS = ("healthy", "pausing", "paused")

WIDTH = 1240
LEFT = 90
RIGHT = 30
EVENT_LABEL_ROWS = 3
TOP = 14 + 11 * EVENT_LABEL_ROWS  # room above a time plot for its event numbers
INSIDE_MIN_SECONDS = 0.5  # a rank shown "inside" a collective once it waited this long
COLLECTIVE_COLORS = ("#263238", "#6a1b9a", "#00838f", "#ad1457", "#5d4037")


def esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def rank_color(rank: int) -> str:
    return RANK_COLORS[rank % len(RANK_COLORS)]


# --- inputs ----------------------------------------------------------------------------------


@dataclass
class PendingSpan:
    rank: int
    ordinal: int | None
    start: float
    end: float
    seconds: float | None
    steps: int | None
    mode: str | None = None


@dataclass
class RunData:
    out_dir: Path
    summary: dict = field(default_factory=dict)
    timeline: list[dict] = field(default_factory=list)
    by_rank: dict[int, list[dict]] = field(default_factory=dict)  # timeline rows, in time order
    events: list[dict] = field(default_factory=list)
    spans: list[dict] = field(default_factory=list)
    pending: list[PendingSpan] = field(default_factory=list)
    sync_waits: dict[int, list[float]] = field(default_factory=dict)  # from dp.sync_round events
    ignored_events: dict[int, int] = field(default_factory=dict)  # dp.start_dp_wave.ignored
    prom_waits: dict[int, list[tuple[float, float]]] = field(default_factory=dict)  # (le, cum)
    prom_wait_sums: dict[int, tuple[float, float]] = field(default_factory=dict)  # (sum, count)
    notes: list[str] = field(default_factory=list)  # what is missing or was skipped
    ranks: list[int] = field(default_factory=list)
    t0: float = 0.0
    t1: float = 1.0


def _read_jsonl(path: Path, notes: list[str]) -> list[dict]:
    if not path.is_file():
        notes.append(f"{path.name} is missing")
        return []
    rows, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(item, dict):
            rows.append(item)
        else:
            bad += 1
    if bad:
        notes.append(f"{path.name}: skipped {bad} unreadable line(s)")
    return rows


def _read_summary(path: Path, notes: list[str]) -> dict:
    if not path.is_file():
        notes.append(f"{path.name} is missing (the run did not finish?): no verdict")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        notes.append(f"{path.name} is unreadable: {e}")
        return {}
    if not isinstance(data, dict):
        notes.append(f"{path.name} is not a JSON object")
        return {}
    return data


def _unix(stamp) -> float | None:
    """OpenTelemetry's ``to_json`` times (ISO 8601, UTC, ``Z``) as unix seconds."""
    if isinstance(stamp, (int, float)):
        return float(stamp)
    if not isinstance(stamp, str) or not stamp:
        return None
    text = stamp.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    match = re.match(r"^(.*T\d\d:\d\d:\d\d)(\.\d+)?(.*)$", text)
    frac = 0.0
    if match:  # fromisoformat before 3.11 takes at most 6 fraction digits
        text = match.group(1) + match.group(3)
        frac = float(match.group(2)) if match.group(2) else 0.0
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp() + frac


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _float(value) -> float | None:
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def _span_rank(span: dict) -> int | None:
    rank = _int((span.get("attributes") or {}).get(n.ATTR_RANK))
    if rank is None:
        rank = _int(((span.get("resource") or {}).get("attributes") or {}).get(n.ATTR_RANK))
    return rank if rank is not None and rank >= 0 else None


def _span_id(span: dict, key: str = "span_id") -> str | None:
    if key == "parent_id":
        return span.get("parent_id")
    return (span.get("context") or {}).get(key)


def _collect_spans(data: RunData) -> None:
    pauses_by_id = {_span_id(s): s for s in data.spans if s.get("name") == n.SPAN_PAUSE}
    for span in data.spans:
        name = span.get("name")
        rank = _span_rank(span)
        if rank is None:
            continue
        attrs = span.get("attributes") or {}
        for event in span.get("events") or []:
            ev_attrs = event.get("attributes") or {}
            if event.get("name") == n.EVENT_SYNC_ROUND:
                wait = _float(ev_attrs.get(n.ATTR_SYNC_SECONDS))
                if wait is not None:
                    data.sync_waits.setdefault(rank, []).append(wait)
            elif event.get("name") == n.EVENT_START_DP_WAVE_IGNORED:
                data.ignored_events[rank] = data.ignored_events.get(rank, 0) + 1
        if name != n.SPAN_PENDING:
            continue
        start, end = _unix(span.get("start_time")), _unix(span.get("end_time"))
        if start is None:
            continue
        end = end if end is not None else start
        parent = pauses_by_id.get(_span_id(span, "parent_id")) or {}
        parent_attrs = parent.get("attributes") or {}
        seconds = _float(attrs.get(n.ATTR_SECONDS_WAITED))
        steps = _int(attrs.get(n.ATTR_STEPS_WAITED))
        data.pending.append(PendingSpan(
            rank=rank, ordinal=_int(parent_attrs.get(n.ATTR_PAUSE_ORDINAL)), start=start,
            end=end, seconds=seconds if seconds is not None else max(0.0, end - start),
            steps=steps, mode=parent_attrs.get(n.ATTR_MODE)))
    # Pauses whose parent span never ended (a legacy deadlock) have no ordinal: number each
    # rank's pending spans in time order, after the known ones.
    by_rank: dict[int, list[PendingSpan]] = {}
    for p in data.pending:
        by_rank.setdefault(p.rank, []).append(p)
    for spans in by_rank.values():
        spans.sort(key=lambda p: p.start)
        used = {p.ordinal for p in spans if p.ordinal is not None}
        next_ordinal = 1
        for p in spans:
            if p.ordinal is None:
                while next_ordinal in used:
                    next_ordinal += 1
                p.ordinal = next_ordinal
                used.add(next_ordinal)
    data.pending.sort(key=lambda p: (p.ordinal or 0, p.rank))


def _read_prom(data: RunData) -> None:
    directory = data.out_dir / METRICS_DIR
    files = sorted(directory.glob("rank-*.prom")) if directory.is_dir() else []
    if not files:
        return
    from prometheus_client.parser import text_string_to_metric_families

    for path in files:
        match = re.fullmatch(r"rank-(\d+)\.prom", path.name)
        if not match:
            continue
        rank = int(match.group(1))
        buckets: list[tuple[float, float]] = []
        total = count = None
        try:
            families = list(text_string_to_metric_families(
                path.read_text(encoding="utf-8", errors="replace")))
        except Exception as e:  # noqa: BLE001 - a bad file is a note, not a crash
            data.notes.append(f"{METRICS_DIR}/{path.name} is unreadable: {type(e).__name__}: {e}")
            continue
        for family in families:
            for s in family.samples:
                if s.name == n.SYNC_WAIT + "_bucket":
                    le = _float(s.labels.get("le")) if s.labels.get("le") != "+Inf" else math.inf
                    if le is not None:
                        buckets.append((le, float(s.value)))
                elif s.name == n.SYNC_WAIT + "_sum":
                    total = float(s.value)
                elif s.name == n.SYNC_WAIT + "_count":
                    count = float(s.value)
        if buckets:
            data.prom_waits[rank] = sorted(buckets)
        if total is not None and count is not None:
            data.prom_wait_sums[rank] = (total, count)


def load_run(out_dir: Path | str) -> RunData:
    out_dir = Path(out_dir)
    data = RunData(out_dir=out_dir)
    data.summary = _read_summary(out_dir / SUMMARY, data.notes)
    data.timeline = [r for r in _read_jsonl(out_dir / TIMELINE, data.notes)
                     if _float(r.get("t")) is not None and _int(r.get("rank")) is not None]
    data.timeline.sort(key=lambda r: (float(r["t"]), int(r["rank"])))
    for row in data.timeline:
        data.by_rank.setdefault(int(row["rank"]), []).append(row)
    data.events = [e for e in _read_jsonl(out_dir / EVENTS, data.notes)
                   if _float(e.get("t")) is not None]
    data.events.sort(key=lambda e: float(e["t"]))
    data.spans = _read_jsonl(out_dir / SPANS, data.notes)
    _collect_spans(data)
    _read_prom(data)

    ranks = {int(r["rank"]) for r in data.timeline}
    ranks |= {p.rank for p in data.pending}
    n_ranks = _int(data.summary.get("ranks"))
    if n_ranks and n_ranks > 0:
        ranks |= set(range(n_ranks))
    data.ranks = sorted(r for r in ranks if r >= 0)

    times = [float(r["t"]) for r in data.timeline] + [float(e["t"]) for e in data.events]
    times += [t for p in data.pending for t in (p.start, p.end)]
    if times:
        data.t0, data.t1 = min(times), max(times)
        if data.t1 - data.t0 < 1e-3:
            data.t1 = data.t0 + 1.0
    return data


# --- SVG helpers -----------------------------------------------------------------------------


def _nice_step(span: float, target: int = 8) -> float:
    if span <= 0 or not math.isfinite(span):
        return 1.0
    raw = span / target
    power = 10 ** math.floor(math.log10(raw))
    for mult in (1, 2, 2.5, 5, 10):
        if raw <= mult * power:
            return mult * power
    return 10 * power


def _fmt_num(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 1:
        return f"{value:.4g}"
    return f"{value:.3g}"


def _fmt_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value == math.inf:
        return "+Inf"
    if value < 1e-3:
        return f"{value * 1e6:.0f} µs"
    if value < 1:
        return f"{value * 1e3:.3g} ms"
    return f"{value:.3g} s"


def _svg_open(kind: str, height: int, label: str) -> str:
    return (f'<svg class="plot" data-plot="{esc(kind)}" xmlns="http://www.w3.org/2000/svg" '
            f'width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" role="img" '
            f'aria-label="{esc(label)}">')


def _text(x: float, y: float, text: str, anchor: str = "start", cls: str = "",
          extra: str = "") -> str:
    cls_attr = f' class="{esc(cls)}"' if cls else ""
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{cls_attr}{extra}>'
            f"{esc(text)}</text>")


def _time_axis(data: RunData, x_of, y: float, top: float) -> list[str]:
    parts = [f'<line class="axis" x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}"/>']
    span = data.t1 - data.t0
    step = _nice_step(span, 12)
    k = 0
    while k * step <= span + 1e-9:
        x = x_of(data.t0 + k * step)
        parts.append(f'<line class="grid" x1="{x:.1f}" y1="{top:.1f}" x2="{x:.1f}" y2="{y:.1f}"/>')
        parts.append(_text(x, y + 16, _fmt_num(k * step), "middle", "tick"))
        k += 1
    parts.append(_text((LEFT + WIDTH - RIGHT) / 2, y + 34, "seconds since the recording started",
                       "middle", "axis-label"))
    return parts


def _event_markers(data: RunData, x_of, top: float, bottom: float) -> list[str]:
    parts = []
    last_x = [-1e9] * EVENT_LABEL_ROWS  # labels of close events go to the next row up
    for i, event in enumerate(data.events, 1):
        x = x_of(float(event["t"]))
        row = next((r for r, lx in enumerate(last_x) if x - lx >= 14),
                   min(range(EVENT_LABEL_ROWS), key=lambda r: last_x[r]))
        last_x[row] = x
        title = f"{i}. {float(event['t']) - data.t0:.2f} s [{event.get('step', '')}] " \
                f"{event.get('event', '')}"
        parts.append(f'<g class="event-marker"><title>{esc(title)}</title>'
                     f'<line x1="{x:.1f}" y1="{top:.1f}" x2="{x:.1f}" y2="{bottom:.1f}"/>'
                     + _text(x, top - 4 - row * 11, str(i), "middle", "event-label")
                     + "</g>")
    return parts


def _x_mapper(data: RunData):
    span = data.t1 - data.t0
    plot_w = WIDTH - LEFT - RIGHT

    def x_of(t: float) -> float:
        return LEFT + (t - data.t0) / span * plot_w

    return x_of


def _legend(items: list[tuple[str, str]], y: float, x: float = LEFT) -> list[str]:
    parts = []
    for label, color in items:
        parts.append(f'<rect x="{x:.1f}" y="{y - 10:.1f}" width="12" height="12" '
                     f'fill="{esc(color)}"/>')
        parts.append(_text(x + 16, y, label, cls="legend"))
        x += 24 + 7.5 * len(label)
        if x > WIDTH - RIGHT - 120:
            x = LEFT
            y += 18
    return parts


def _states_of_rank(data: RunData, rank: int) -> list[tuple[float, float, str, dict]]:
    """Merged (start, end, state, first row) segments for one rank's lane."""
    rows = data.by_rank.get(rank, [])
    segments: list[tuple[float, float, str, dict]] = []
    for i, row in enumerate(rows):
        start = float(row["t"])
        end = float(rows[i + 1]["t"]) if i + 1 < len(rows) else max(data.t1, start)
        state = "unreachable" if not row.get("reachable") else row.get("phase") or "running"
        if state not in STATE_COLORS:
            state = "running"
        if segments and segments[-1][2] == state:
            segments[-1] = (segments[-1][0], end, state, segments[-1][3])
        else:
            segments.append((start, end, state, row))
    return segments


def _collective_color(collective: str) -> str:
    known = list(n.COLLECTIVES)
    index = known.index(collective) if collective in known else len(known)
    return COLLECTIVE_COLORS[index % len(COLLECTIVE_COLORS)]


def _inside_of_rank(data: RunData, rank: int) -> list[tuple[float, float, str]]:
    """(start, end, collective) while a rank sat inside one collective for a while.

    ``inside_seconds`` dates the entry, so a wait is drawn from when it began, not from the
    first scrape that saw it."""
    rows = data.by_rank.get(rank, [])
    spans: list[tuple[float, float, str]] = []
    for i, row in enumerate(rows):
        collective = row.get("inside") if row.get("reachable") else None
        seconds = _float(row.get("inside_seconds")) or 0.0
        if not collective or seconds < INSIDE_MIN_SECONDS:
            continue
        t = float(row["t"])
        end = float(rows[i + 1]["t"]) if i + 1 < len(rows) else t
        start = max(data.t0, t - seconds)
        if spans and spans[-1][2] == collective and start <= spans[-1][1] + 1e-6:
            spans[-1] = (spans[-1][0], max(end, spans[-1][1]), collective)
        else:
            spans.append((start, end, str(collective)))
    return spans


def phase_timeline_svg(data: RunData, culprits: set[int]) -> str:
    lane_h, gap = (30, 8) if len(data.ranks) <= 16 else (16, 3)
    top = TOP
    height = top + len(data.ranks) * (lane_h + gap) + 80
    x_of = _x_mapper(data)
    bottom = top + len(data.ranks) * (lane_h + gap)
    parts = [_svg_open("phase-timeline", height, "per-rank pause phase over time")]
    parts += _time_axis(data, x_of, bottom, top)
    for i, rank in enumerate(data.ranks):
        y = top + i * (lane_h + gap)
        cls = "lane-label culprit" if rank in culprits else "lane-label"
        parts.append(_text(LEFT - 10, y + lane_h / 2 + 5, f"rank {rank}", "end", cls))
        parts.append(f'<rect class="lane-bg" x="{LEFT}" y="{y}" width="{WIDTH - LEFT - RIGHT}" '
                     f'height="{lane_h}"/>')
        for start, end, state, _row in _states_of_rank(data, rank):
            x0, x1 = x_of(start), x_of(end)
            parts.append(f'<rect class="seg seg-{esc(state)}" x="{x0:.1f}" y="{y}" '
                         f'width="{max(1.0, x1 - x0):.1f}" height="{lane_h}" '
                         f'fill="{STATE_COLORS[state]}"><title>{esc(f"rank {rank}: {state}")} '
                         f'{esc(f"{start - data.t0:.2f}-{end - data.t0:.2f} s")}</title></rect>')
        # Pending phases last milliseconds (between scrapes): draw them from the spans.
        for p in (p for p in data.pending if p.rank == rank):
            x0, x1 = x_of(p.start), x_of(p.end)
            title = (f"rank {rank} pause #{p.ordinal}: pending {_fmt_seconds(p.seconds)}, "
                     f"{p.steps if p.steps is not None else '?'} steps (span)")
            parts.append(f'<rect class="pending-span" x="{x0 - 1:.1f}" y="{y + lane_h - 7}" '
                         f'width="{max(3.0, x1 - x0 + 2):.1f}" height="7" '
                         f'fill="{STATE_COLORS["pending_pause"]}" stroke="#6d4c00">'
                         f"<title>{esc(title)}</title></rect>")
        for start, end, collective in _inside_of_rank(data, rank):
            x0, x1 = x_of(start), x_of(end)
            color = _collective_color(collective)
            title = (f"rank {rank} inside {collective} "
                     f"{start - data.t0:.2f}-{end - data.t0:.2f} s")
            parts.append(f'<g class="inside"><title>{esc(title)}</title>'
                         f'<rect x="{x0:.1f}" y="{y}" width="{max(2.0, x1 - x0):.1f}" '
                         f'height="{lane_h // 3}" fill="{color}"/>')
            if lane_h >= 30 and x1 - x0 > 7 * len(collective) + 6:
                parts.append(_text(x0 + 3, y + 8, collective, cls="inside-label"))
            parts.append("</g>")
    parts += _event_markers(data, x_of, top - 6, bottom)
    collectives = sorted({c for r in data.ranks for _, _, c in _inside_of_rank(data, r)},
                         key=lambda c: (n.COLLECTIVES + (c,)).index(c))
    parts += _legend([(s.replace("_", " "), STATE_COLORS[s]) for s in STATES]
                     + [(f"inside {c} (≥ {INSIDE_MIN_SECONDS:g} s)", _collective_color(c))
                        for c in collectives], bottom + 58)
    parts.append("</svg>")
    return "".join(parts)


def _y_grid(step: float, y_max: float, y_of) -> list[str]:
    """Horizontal grid lines with their tick labels, every ``step`` up to ``y_max``."""
    parts = []
    k = 0
    while k * step <= y_max + 1e-9:
        y = y_of(k * step)
        parts.append(f'<line class="grid" x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" '
                     f'y2="{y:.1f}"/>')
        parts.append(_text(LEFT - 6, y + 4, _fmt_num(k * step), "end", "tick"))
        k += 1
    return parts


def sync_rounds_svg(data: RunData) -> str | None:
    series = {}
    for rank in data.ranks:
        pts = [(float(r["t"]), _int(r.get("sync_rounds"))) for r in data.by_rank.get(rank, [])
               if r.get("reachable")]
        pts = [(t, v) for t, v in pts if v is not None]
        if pts:
            series[rank] = pts
    if not series:
        return None
    top, plot_h = TOP, 260
    bottom = top + plot_h
    height = bottom + 80
    x_of = _x_mapper(data)
    y_max = max(v for pts in series.values() for _, v in pts) or 1
    step = _nice_step(y_max, 6)
    y_max = math.ceil(y_max / step) * step

    def y_of(v: float) -> float:
        return bottom - v / y_max * plot_h

    parts = [_svg_open("sync-rounds", height, "sync rounds over time per rank")]
    parts += _time_axis(data, x_of, bottom, top)
    parts += _y_grid(step, y_max, y_of)
    parts.append(_text(18, top + plot_h / 2, "sync rounds (total)", "middle", "axis-label",
                       f' transform="rotate(-90 18 {top + plot_h / 2:.1f})"'))
    for rank, pts in series.items():
        coords = " ".join(f"{x_of(t):.1f},{y_of(v):.1f}" for t, v in pts)
        parts.append(f'<polyline class="series" fill="none" stroke="{rank_color(rank)}" '
                     f'stroke-width="2" points="{coords}"><title>rank {rank}: '
                     f"{pts[-1][1]} sync rounds at the end</title></polyline>")
    parts += _event_markers(data, x_of, top, bottom)
    parts += _legend([(f"rank {r}", rank_color(r)) for r in series], bottom + 58)
    parts.append("</svg>")
    return "".join(parts)


def bar_chart_svg(kind: str, label: str, groups: list[str], series: list[tuple[str, str]],
                  values: list[list[float]], y_label: str, stacked: bool = False,
                  value_fmt=_fmt_num, height: int = 330) -> str:
    """Bars for ``values[group][series]``: side by side per group, or stacked."""
    top, bottom = 24, height - 90
    plot_h = bottom - top
    plot_w = WIDTH - LEFT - RIGHT
    totals = [sum(v) if stacked else max(v, default=0) for v in values]
    y_max = max(totals, default=0) or 1
    step = _nice_step(y_max, 5)
    y_max = math.ceil(y_max / step) * step or 1

    def y_of(v: float) -> float:
        return bottom - v / y_max * plot_h

    parts = [_svg_open(kind, height, label)]
    parts += _y_grid(step, y_max, y_of)
    parts.append(f'<line class="axis" x1="{LEFT}" y1="{bottom}" x2="{WIDTH - RIGHT}" '
                 f'y2="{bottom}"/>')
    parts.append(_text(18, top + plot_h / 2, y_label, "middle", "axis-label",
                       f' transform="rotate(-90 18 {top + plot_h / 2:.1f})"'))
    group_w = plot_w / max(1, len(groups))
    inner = min(group_w * 0.8, 90 if stacked else 56 * max(1, len(series)))
    bar_w = inner if stacked else inner / max(1, len(series))
    rotate = len(groups) > 12
    for g, group in enumerate(groups):
        gx = LEFT + g * group_w + (group_w - inner) / 2
        acc = 0.0
        for s, (name, color) in enumerate(series):
            v = values[g][s] if s < len(values[g]) else 0
            if not v:
                continue
            if stacked:
                y0, y1 = y_of(acc + v), y_of(acc)
                x = gx
                acc += v
            else:
                y0, y1 = y_of(v), bottom
                x = gx + s * bar_w
            parts.append(f'<rect class="bar" x="{x:.1f}" y="{y0:.1f}" '
                         f'width="{max(1.0, bar_w - 1):.1f}" height="{max(0.5, y1 - y0):.1f}" '
                         f'fill="{esc(color)}"><title>{esc(f"{group}, {name}: {value_fmt(v)}")}'
                         f"</title></rect>")
        cx = LEFT + (g + 0.5) * group_w
        if rotate:
            parts.append(_text(cx + 4, bottom + 12, group, "end", "tick",
                               f' transform="rotate(-40 {cx + 4:.1f} {bottom + 12:.1f})"'))
        else:
            parts.append(_text(cx, bottom + 16, group, "middle", "tick"))
    parts += _legend(series, height - 14)
    parts.append("</svg>")
    return "".join(parts)


# --- sections --------------------------------------------------------------------------------


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
        if exp_kind == "healthy":
            match = verdict in HEALTHY_VERDICTS
        else:
            match = verdict == exp_kind and (exp_kind == "deadlock" or culprits == exp_culprits)
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
