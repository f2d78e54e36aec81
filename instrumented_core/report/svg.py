"""Inline SVG: axes, legends, and the plots (phase timeline, sync rounds, bar charts)."""

from __future__ import annotations

import math

from instrumented_core.report.data import RunData, _float, _int
from instrumented_core.report.theme import (
    COLLECTIVE_COLORS,
    EVENT_LABEL_ROWS,
    INSIDE_MIN_SECONDS,
    LEFT,
    RIGHT,
    STATE_COLORS,
    STATES,
    TOP,
    WIDTH,
    esc,
    rank_color,
)
from instrumented_core.telemetry import names as n


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
