"""Reading a run's output directory back: ``load_run`` gives a ``RunData``; anything
missing or partial becomes a note instead of an error."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from instrumented_core.run_files import EVENTS, METRICS_DIR, SPANS, SUMMARY, TIMELINE
from instrumented_core.telemetry import names as n


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
