"""One cross-rank verdict from the flight recorder's hang dumps (``instrumented-core analyze``).

Why offline and from files: the dumps are written by each rank's own watchdog at the moment it
is stuck, so they outlive a restarted pod or a killed rank; this module only reads them. It
merges every rank's newest dump into one timeline and compares the ranks' DP collective
sequences (every rank's n-th collective of ``names.DP_SEQUENCED_COLLECTIVES`` must be the same
kind): the first n where they differ is the divergence, e.g. "DP collective #57: rank 0 in
barrier; ranks 1-3 in sync_dp_state". Ranks that never entered #n hold their peers up
(culprits); when all entered but disagree, the side a ``START_DP_WAVE`` woke from a pause is the
culprit (vLLM #36594), else the smaller side. Pure: ``analyze`` takes parsed dumps.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from instrumented_core.telemetry import names as n

__all__ = ["FlightAnalysis", "FlightInputError", "analyze", "load_dumps", "rank_list",
           "write_bundle"]

DUMP_FORMAT = "instrumented_core.flight/1"
LAST_EVENTS = 8
TIMELINE_EVENTS = 24
MAX_DUMP_BYTES = 4 * 1024 * 1024  # what we read; the watchdog writes at most 512 KiB


class FlightInputError(ValueError):
    """A dump source that cannot be read; the message is one line with the fix."""


# -- reading ------------------------------------------------------------------------------------

def _parse(raw: bytes, where: str) -> dict[str, Any] | None:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or data.get("format") != DUMP_FORMAT:
        return None
    data["_source"] = where
    return data


def load_dumps(source: str | Path) -> list[dict[str, Any]]:
    """Every flight dump under a directory (recursively) or inside a ``.tar.gz`` bundle."""
    path = Path(source)
    dumps: list[dict[str, Any]] = []
    if path.is_dir():
        for f in sorted(path.rglob("flight-rank*.json")):
            if f.stat().st_size <= MAX_DUMP_BYTES:
                d = _parse(f.read_bytes(), str(f))
                if d is not None:
                    dumps.append(d)
    elif path.is_file():
        try:
            with tarfile.open(path, "r:*") as tar:
                for member in tar.getmembers():
                    name = Path(member.name).name
                    if (member.isfile() and name.startswith("flight-rank")
                            and name.endswith(".json") and member.size <= MAX_DUMP_BYTES):
                        f = tar.extractfile(member)
                        d = _parse(f.read(), member.name) if f is not None else None
                        if d is not None:
                            dumps.append(d)
        except (tarfile.TarError, OSError) as e:
            raise FlightInputError(f"{source} is not a readable tar bundle ({e}): pass a dump "
                                   "directory or a bundle written by analyze --bundle") from None
    else:
        raise FlightInputError(f"{source} does not exist: pass the flight dump directory "
                               "(default: flight/ next to the spans file) or a bundle")
    if not dumps:
        raise FlightInputError(f"no flight dumps (flight-rank*.json) in {source}: a rank writes "
                               "one only when it is stuck past its watchdog threshold")
    return dumps


# -- the analysis -------------------------------------------------------------------------------

@dataclass
class RankState:
    rank: int
    dump: dict[str, Any]
    entries: dict[int, str]  # DP collective sequence number -> kind (from the ring)
    dp_seq: int
    position: str
    seconds: float

    @property
    def lowest(self) -> int | None:
        return min(self.entries) if self.entries else None


@dataclass
class FlightAnalysis:
    ranks: list[int]
    dp_size: int
    missing: list[int]
    divergence_seq: int | None = None
    divergence: str = ""
    culprits: list[int] = field(default_factory=list)
    victims: list[int] = field(default_factory=list)
    cause: str = ""
    positions: dict[int, str] = field(default_factory=dict)
    stacks: dict[int, list[str]] = field(default_factory=dict)
    last_events: dict[int, list[str]] = field(default_factory=dict)
    timeline: list[str] = field(default_factory=list)
    dumps: dict[int, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (
            "ranks", "dp_size", "missing", "divergence_seq", "divergence", "culprits",
            "victims", "cause", "positions", "stacks", "last_events", "timeline", "dumps")}

    def render(self) -> str:
        lines = [f"flight recorder: dumps of {rank_list(self.ranks)} (DP {self.dp_size})"
                 + (f"; no dump from {rank_list(self.missing)}" if self.missing else "")]
        if self.divergence:
            lines.append(f"first divergence: {self.divergence}")
        else:
            lines.append("first divergence: none (the ranks' DP collective sequences agree)")
        if self.cause:
            lines.append(f"cause: {self.cause}")
        if self.culprits:
            lines.append(f"culprit: {rank_list(self.culprits)}")
        if self.victims:
            lines.append(f"victims: {rank_list(self.victims)}")
        for r in self.ranks:
            lines.append(f"rank {r}: {self.positions[r]}  [{self.dumps[r]}]")
        for r in self.culprits:
            stack = self.stacks.get(r) or []
            if stack:
                lines.append(f"rank {r} engine thread stack at the dump (innermost last):")
                lines.extend("    " + line for line in _compact_stack(stack)[-8:])
        lines.append("last events per rank:")
        for r in self.ranks:
            lines.append(f"  rank {r}:")
            lines.extend("    " + e for e in self.last_events.get(r, []))
        lines.append("merged timeline (newest last):")
        lines.extend("  " + e for e in self.timeline)
        return "\n".join(lines)


def rank_list(ranks: Iterable[int]) -> str:
    """``rank 0`` / ``ranks 1-3`` / ``ranks 0, 2``."""
    rs = sorted(set(ranks))
    if not rs:
        return "no rank"
    if len(rs) == 1:
        return f"rank {rs[0]}"
    if rs == list(range(rs[0], rs[-1] + 1)) and len(rs) > 2:
        return f"ranks {rs[0]}-{rs[-1]}"
    return "ranks " + ", ".join(map(str, rs))


def _clock(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%H:%M:%S.%f")[:-3]


_SKIP = {"no", "ts", "kind", "dp_seq", "step_seq"}


def describe_event(e: dict[str, Any]) -> str:
    detail = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in e.items() if k not in _SKIP)
    return (f"{_clock(float(e.get('ts', 0)))} #{e.get('dp_seq', 0)} "
            f"{e.get('kind', '?')} {detail}").rstrip()


def _compact_stack(stack: list[str]) -> list[str]:
    """``File "f.py", line 3, in fn | code`` per frame."""
    out = []
    for frame in stack:
        parts = [p.strip() for p in frame.strip().splitlines() if p.strip()]
        if parts:
            out.append(" | ".join(parts[:2]))
    return out


def _rank_state(d: dict[str, Any]) -> RankState:
    entries: dict[int, str] = {}
    for e in d.get("events", []):
        if e.get("kind") == "enter" and e.get("collective"):
            entries[int(e["dp_seq"])] = str(e["collective"])
    inside = d.get("inside") or {}
    written = float(d.get("written_at", 0.0))
    dp_seq = int(d.get("dp_seq", 0))
    seconds = 0.0
    dp_inside = [c for c in inside if c in n.DP_SEQUENCED_COLLECTIVES]
    if dp_inside:
        c = dp_inside[0]
        seconds = written - float(inside[c])
        entries.setdefault(dp_seq, c)
        position = f"in {c} (DP collective #{dp_seq}) for {seconds:.1f} s"
    elif n.COLLECTIVE_STEP in inside:
        seconds = written - float(inside[n.COLLECTIVE_STEP])
        position = (f"inside step (model collective #{d.get('step_seq', 0)}) for "
                    f"{seconds:.1f} s, after DP collective #{dp_seq}")
    else:
        seconds = written - float(d.get("last_progress", written))
        position = (f"in no collective, phase {d.get('phase')}, no progress for "
                    f"{seconds:.1f} s, after DP collective #{dp_seq}")
    return RankState(int(d["rank"]), d, entries, dp_seq, position, seconds)


def _waking_wave(st: RankState, before_seq: int) -> dict[str, Any] | None:
    """The last START_DP_WAVE this rank acted on while paused, before ``before_seq``: a wave
    that wakes a paused rank into steps its peers do not take (#36594). With the legacy
    one-phase pause any wave acted on between a pause request and the resume counts (vLLM's
    flags there cannot tell a paused rank from a pausing one); with two-phase only one acted on
    in the paused phase (a pending rank keeps stepping until consensus: normal)."""
    legacy = st.dump.get("protocol") == "legacy"
    found = None
    pausing = False
    for e in st.dump.get("events", []):
        if int(e.get("dp_seq", 0)) >= before_seq:
            break
        kind = e.get("kind")
        if kind == "pause_requested":
            pausing = True
        elif kind == "resumed":
            pausing = False
        elif kind == "start_dp_wave" and e.get("outcome") == "acted" and (
                e.get("phase") == "paused" or (legacy and pausing)):
            found = e
    return found


def analyze(dumps: list[dict[str, Any]]) -> FlightAnalysis:
    """The cross-rank verdict from every rank's newest dump (older ones are history)."""
    newest: dict[int, dict[str, Any]] = {}
    for d in dumps:
        r = int(d["rank"])
        if r not in newest or float(d["written_at"]) > float(newest[r]["written_at"]):
            newest[r] = d
    states = {r: _rank_state(d) for r, d in sorted(newest.items())}
    dp_size = max([int(d.get("dp_size", 0)) for d in newest.values()] + [len(states)])
    out = FlightAnalysis(ranks=sorted(states), dp_size=dp_size,
                         missing=[r for r in range(dp_size) if r not in states])
    for r, st in states.items():
        out.positions[r] = st.position
        out.stacks[r] = list(st.dump.get("stack", []))
        out.dumps[r] = Path(str(st.dump.get("_source", "?"))).name
        events = st.dump.get("events", [])
        out.last_events[r] = [describe_event(e) for e in events[-LAST_EVENTS:]]
    merged = sorted(((float(e.get("ts", 0)), r, e) for r, st in states.items()
                     for e in st.dump.get("events", [])[-TIMELINE_EVENTS:]),
                    key=lambda t: (t[0], t[1]))
    out.timeline = [f"rank {r} {describe_event(e)}" for _, r, e in merged[-TIMELINE_EVENTS:]]
    _find_divergence(states, out)
    return out


def _dp_inside(st: RankState) -> str | None:
    return next((c for c in st.dump.get("inside") or {} if c in n.DP_SEQUENCED_COLLECTIVES), None)


def _find_divergence(states: dict[int, RankState], out: FlightAnalysis) -> None:
    if len(states) >= 2:
        lows = [st.lowest for st in states.values() if st.lowest is not None]
        start = max(lows) if lows else 1
        top = max(st.dp_seq for st in states.values())
        for seq in range(start, top + 1):
            kinds: dict[str, list[int]] = {}
            for r, st in states.items():
                kind = st.entries.get(seq) if seq <= st.dp_seq else None
                kinds.setdefault(kind or "", []).append(r)
            if len(kinds) > 1:
                _name_divergence(seq, kinds, states, out)
                return
    # the dumped ranks agree: a collective still waited in lacks a rank that left no dump (it
    # died, was restarted, or was never stuck itself), else whoever waits in none holds it up
    waiting = [r for r, st in states.items() if _dp_inside(st)]
    if out.missing and waiting and len(waiting) == len(states):
        seq = max(states[r].dp_seq for r in waiting)
        kinds_now = sorted({str(_dp_inside(states[r])) for r in waiting})
        out.divergence_seq = seq
        out.divergence = (f"DP collective #{seq}: {rank_list(waiting)} in "
                          f"{'/'.join(kinds_now)}; {rank_list(out.missing)} left no dump (dead, "
                          "restarted, or never stuck itself): the rank they wait for")
        out.culprits, out.victims = list(out.missing), waiting
        return
    elsewhere = [r for r in states if r not in waiting]
    if elsewhere:
        out.culprits, out.victims = elsewhere, waiting


def _name_divergence(seq: int, kinds: dict[str, list[int]], states: dict[int, RankState],
                     out: FlightAnalysis) -> None:
    out.divergence_seq = seq
    parts = []
    for kind, ranks in sorted(kinds.items(), key=lambda kv: kv[1][0]):
        if kind:
            parts.append(f"{rank_list(ranks)} in {kind}")
        else:
            where = "; ".join(sorted({states[r].position.split(",")[0] for r in ranks}))
            parts.append(f"{rank_list(ranks)} never entered it ({where})")
    out.divergence = f"DP collective #{seq}: " + "; ".join(parts)
    absent = kinds.get("", [])
    if absent:
        culprits = absent
    else:
        woken = [r for ranks in kinds.values() for r in ranks
                 if _waking_wave(states[r], seq + 1) is not None]
        if woken:
            group = next(ranks for ranks in kinds.values() if woken[0] in ranks)
            culprits = group
        else:
            culprits = min(kinds.values(), key=lambda rs: (len(rs), -rs[0]))
    out.culprits = sorted(culprits)
    out.victims = sorted(r for r in states if r not in culprits)
    causes = []
    for r in out.culprits:
        wave = _waking_wave(states[r], seq + 1)
        if wave is not None:
            causes.append((r, wave))
    if causes:
        r, wave = causes[0]
        others = [c[0] for c in causes[1:]]
        out.cause = (f"START_DP_WAVE (wave {wave.get('wave')}) acted on during a pause "
                     f"(phase {wave.get('phase')}) by rank {r} at {_clock(float(wave['ts']))} (event "
                     f"#{wave.get('no')}, after DP collective #{wave.get('dp_seq')}): it woke "
                     f"the paused rank into steps its peers never took"
                     + (f"; also {rank_list(others)}" if others else ""))


# -- the bundle ---------------------------------------------------------------------------------

def write_bundle(dumps: list[dict[str, Any]], analysis: FlightAnalysis | None, out: str | Path,
                 extra: dict[str, str] | None = None) -> Path:
    """A ``.tar.gz`` with every dump and the analysis (text and JSON), plus ``extra`` files
    (the doctor's live verdict): one file to attach to the incident, readable again with
    ``analyze``."""
    out = Path(out)
    with tarfile.open(out, "w:gz") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for d in dumps:
            body = {k: v for k, v in d.items() if k != "_source"}
            add(f"dumps/{Path(str(d.get('_source', 'dump.json'))).name}",
                json.dumps(body).encode())
        if analysis is not None:
            add("analysis.txt", (analysis.render() + "\n").encode())
            add("analysis.json", json.dumps(analysis.as_dict(), indent=1).encode())
        for name, text in (extra or {}).items():
            add(name, text.encode())
    return out
