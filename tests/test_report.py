"""``report.html``: built from a run's own files, self-contained, and it renders in Chromium.

- Without a browser (fast): partial and empty output directories (a crashed run, a dead rank's
  unreachable rows, no spans, a garbage line) still give a page that says what is missing;
  every text is escaped; the ranks' final metrics (``metrics/rank-<r>.prom``) feed the
  all-reduce wait histogram; the page references nothing outside itself.
- In headless Chromium (``browser``): a real ``instrumented-core demo --no-live`` run's report
  is opened; the dumped DOM has every plot and the page's own script reported it rendered with
  no script error; the screenshot is decoded (a small PNG reader, no imaging library) and
  shows the plots' colors, so the page is not blank. A control page with a deliberate script
  error proves the error check can fail.
"""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from instrumented_core import report, run_files
from instrumented_core.report import theme
from instrumented_core.run_files import EVENTS, TIMELINE
from instrumented_core.telemetry import names as n
from tests.helpers import require_tool

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync")
DEMO_TIMEOUT = 240
BROWSER_TIMEOUT = 90
DEMO_PLOTS = {"phase-timeline", "sync-rounds", "consensus-seconds", "consensus-steps",
              "start-dp-wave"}
WAIT_PLOTS = {"sync-wait-spans", "sync-wait-metrics"}
EXTERNAL = re.compile(r"""(?:src|href|url)\s*[=(]\s*["']?\s*(?:https?:|//|file:)""", re.I)


# --- helpers ---------------------------------------------------------------------------------


def run_bounded(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on timeout the whole group is killed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
        pytest.fail(f"{cmd[0]} did not finish in {timeout} s\nstdout:\n{out[-3000:]}\n"
                    f"stderr:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def chromium(page: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    exe = require_tool("chromium")
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)
    return run_bounded([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args,
                        page.resolve().as_uri()], BROWSER_TIMEOUT)


class Dom(HTMLParser):
    """Tags with attributes, plus the text of ``#script-errors`` and ``#render-status``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.texts: dict[str, str] = {}
        self._open: list[str | None] = []
        self.feed(text)

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
            "source", "track", "wbr"}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.elements.append((tag, attrs))
        if tag not in self.VOID:
            self._open.append(attrs.get("id"))

    def handle_startendtag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if self._open:
            self._open.pop()

    def handle_data(self, data):
        for ident in self._open:
            if ident:
                self.texts[ident] = self.texts.get(ident, "") + data

    def find(self, tag: str, **attrs) -> list[dict]:
        return [a for t, a in self.elements
                if t == tag and all(a.get(k.rstrip("_")) == v for k, v in attrs.items())]

    @property
    def body(self) -> dict:
        return next(a for t, a in self.elements if t == "body")

    def plots(self) -> set[str]:
        return {a.get("data-plot") for t, a in self.elements
                if t == "svg" and "plot" in (a.get("class") or "").split()}


def read_png(path: Path) -> tuple[int, int, int, list[bytes]]:
    """(width, height, bytes per pixel, rows) of an 8-bit non-interlaced PNG (what Chromium
    writes); enough of the format to look at a screenshot without an imaging library."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    pos, idat, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    assert header is not None, "PNG without IHDR"
    width, height, depth, color_type, _, _, interlace = header
    assert depth == 8 and interlace == 0 and color_type in (0, 2, 4, 6), header
    bpp = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    raw = zlib.decompress(b"".join(idat))
    stride = width * bpp
    assert len(raw) == height * (stride + 1), "truncated image data"
    prev = bytearray(stride)
    rows = []
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        if kind == 1:  # Sub
            for x in range(bpp, stride):
                line[x] = (line[x] + line[x - bpp]) & 255
        elif kind == 2:  # Up
            line = bytearray((a + b) & 255 for a, b in zip(line, prev))
        elif kind == 3:  # Average
            for x in range(stride):
                left = line[x - bpp] if x >= bpp else 0
                line[x] = (line[x] + ((left + prev[x]) >> 1)) & 255
        elif kind == 4:  # Paeth
            for x in range(stride):
                a = line[x - bpp] if x >= bpp else 0
                b = prev[x]
                c = prev[x - bpp] if x >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        else:
            assert kind == 0, f"unknown PNG filter {kind}"
        rows.append(bytes(line))
        prev = line
    return width, height, bpp, rows


def color_counts(rows: list[bytes], bpp: int) -> dict[bytes, int]:
    counts: dict[bytes, int] = {}
    for row in rows:
        for x in range(0, len(row), bpp):
            rgb = row[x:x + 3]
            counts[rgb] = counts.get(rgb, 0) + 1
    return counts


def rgb(hex_color: str) -> bytes:
    return bytes.fromhex(hex_color.lstrip("#"))


def write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def rank_row(t: float, rank: int, phase: str = "running", **extra) -> dict:
    row = {"t": t, "rank": rank, "reachable": True, "phase": phase, "wave": 1,
           "engines_running": phase == "running", "steps_real": int(t * 10), "steps_dummy": 2,
           "sync_rounds": int(t * 2), "sync_inside_seconds": 0.0, "inside": None,
           "inside_seconds": 0.0,
           "start_dp_wave": {"acted": 2, "ignored": 1, "stale": 0, "excluded": 0},
           "pause_requests": 1, "consensus": 1, "last_progress": t}
    row.update(extra)
    return row


# --- without a browser -----------------------------------------------------------------------


def test_partial_run_still_gives_a_report(tmp_path):
    """A crashed dead-rank run: no summary, no spans, unreachable rows, a torn last line."""
    t0 = 1_700_000_000.0
    rows = []
    for i in range(20):
        t = t0 + i * 0.25
        for rank in range(3):
            if rank == 2 and i >= 12:
                rows.append({"t": t, "rank": rank, "reachable": False})
            else:
                rows.append(rank_row(t, rank, "paused" if 4 <= i < 8 else "running",
                                     inside="sync_dp_state" if i > 14 else None,
                                     inside_seconds=(i - 14) * 0.25 if i > 14 else 0.0))
    write_jsonl(tmp_path / TIMELINE, rows + ['{"t": 17000'])
    write_jsonl(tmp_path / EVENTS, [
        {"t": t0, "event": "traffic for 2 s", "step": "traffic"},
        {"t": t0 + 3, "event": "injecting 'dead' on rank 2 <script>alert(1)</script>",
         "step": "fault"}])

    path = report.build_report(tmp_path)

    assert path == tmp_path / run_files.REPORT
    page = path.read_text()
    assert "summary.json is missing" in page
    assert "spans.jsonl is missing" in page
    assert "timeline.jsonl: skipped 1 unreadable line(s)" in page
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page
    dom = Dom(page)
    assert {"phase-timeline", "sync-rounds", "start-dp-wave"} <= dom.plots()
    assert dom.find("rect", class_="seg seg-unreachable"), "the dead rank's lane is not red"
    assert dom.find("g", class_="inside"), "waiting inside sync_dp_state is not drawn"
    assert f"no {n.SPAN_PENDING} spans" in page
    assert not EXTERNAL.search(page)


def test_empty_directory(tmp_path):
    page = report.build_report(tmp_path / "never-ran").read_text()
    dom = Dom(page)
    assert dom.plots() == set()
    assert "no per-rank samples recorded" in page
    assert "no all-reduce waits recorded" in page
    assert dom.find("div", id="script-errors")


def test_final_metrics_and_spans_feed_the_plots(tmp_path):
    """Wait histogram from ``metrics/rank-<r>.prom``; latency per rank per pause from spans."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from instrumented_core.telemetry.metrics import SYNC_WAIT_BUCKETS

    (tmp_path / run_files.METRICS_DIR).mkdir()
    for rank in range(2):
        registry = CollectorRegistry()
        hist = Histogram(n.SYNC_WAIT, "wait", [n.LABEL_ENGINE], buckets=SYNC_WAIT_BUCKETS,
                         registry=registry).labels(str(rank))
        for wait in (0.0003, 0.002, 0.002, 0.02 if rank == 0 else 0.08, 3.0):
            hist.observe(wait)
        (tmp_path / run_files.METRICS_DIR / f"rank-{rank}.prom").write_bytes(
            generate_latest(registry))
    t0 = 1_700_000_000.0
    write_jsonl(tmp_path / TIMELINE, [rank_row(t0 + i * 0.25, r) for i in range(8)
                                      for r in range(2)])

    def stamp(t: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f"{t % 1:.6f}"[1:] + "Z"

    spans = []
    for ordinal in (1, 2):
        for rank in range(2):
            start = t0 + ordinal
            pause_id = f"0x{ordinal}{rank}"
            spans.append({"name": n.SPAN_PAUSE, "context": {"span_id": pause_id},
                          "start_time": stamp(start), "end_time": stamp(start + 0.5),
                          "attributes": {n.ATTR_RANK: rank, n.ATTR_PAUSE_ORDINAL: ordinal,
                                         n.ATTR_MODE: "keep"}})
            spans.append({
                "name": n.SPAN_PENDING, "context": {"span_id": pause_id + "1"},
                "parent_id": pause_id, "start_time": stamp(start),
                "end_time": stamp(start + 0.01 * (rank + 1)),
                "attributes": {n.ATTR_RANK: rank, n.ATTR_STEPS_WAITED: 3 + rank,
                               n.ATTR_SECONDS_WAITED: 0.0123 * (rank + 1)},
                "events": [{"name": n.EVENT_SYNC_ROUND, "timestamp": stamp(start),
                            "attributes": {n.ATTR_SYNC_SECONDS: 0.004}}]})
    write_jsonl(tmp_path / run_files.SPANS, spans)

    page = report.build_report(tmp_path).read_text()
    dom = Dom(page)
    assert {"sync-wait-metrics", "sync-wait-spans", "consensus-seconds",
            "consensus-steps"} <= dom.plots()
    assert "≤ 100 ms, rank 1: 1" in page and "≤ 30 ms, rank 0: 1" in page
    assert "pause 2, rank 1: 24.6 ms" in page  # 0.0246 s, drawn in milliseconds
    assert "pause 2, rank 1: 4" in page  # steps
    assert "&gt; 1 s, rank 0: 1" in page  # 3.0 s lands above the last bound (1 s)


def test_verdict_banner_and_table(tmp_path):
    t0 = 1_700_000_000.0
    write_jsonl(tmp_path / TIMELINE, [rank_row(t0 + i, r) for i in range(3) for r in range(3)])
    (tmp_path / run_files.SUMMARY).write_text(json.dumps({
        "protocol": "two-phase", "ranks": 3, "verdict": "stuck", "culprit_ranks": [2],
        "victim_ranks": [0, 1], "summary": "rank 2 not in sync_dp_state & <late>",
        "details": ["rank 0 inside sync_dp_state for 3.0 s"],
        "expected": {"verdict": "stuck", "culprit_ranks": [2]}}))
    page = report.build_report(tmp_path).read_text()
    assert "rank 2 not in sync_dp_state &amp; &lt;late&gt;" in page
    assert "as expected" in page and "NOT as expected" not in page
    dom = Dom(page)
    culprit_rows = dom.find("tr", class_="culprit")
    assert len(culprit_rows) == 1


# --- in headless Chromium --------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """One real ``instrumented-core demo --no-live`` run (it calls build_report itself)."""
    out = tmp_path_factory.mktemp("demo")
    started = time.monotonic()
    proc = run_bounded([sys.executable, "-m", "instrumented_core.cli", "demo", "--no-live",
                        "--duration", "5", "--out", str(out), "--metrics-port-base", "0",
                        "--seed", "1"], DEMO_TIMEOUT, cwd=REPO)
    page = out / run_files.REPORT
    assert page.is_file(), (f"demo wrote no report (exit {proc.returncode} after "
                            f"{time.monotonic() - started:.0f} s)\nstdout:\n{proc.stdout[-3000:]}"
                            f"\nstderr:\n{proc.stderr[-3000:]}")
    for name in (run_files.SUMMARY, run_files.SPANS, TIMELINE, EVENTS):
        assert (out / name).is_file(), f"demo did not write {name}"
    return out


@pytest.mark.browser
@pytest.mark.cluster  # the demo starts a real CPU cluster
def test_demo_report_renders_in_chromium(demo_run, tmp_path):
    page = demo_run / run_files.REPORT
    html_text = page.read_text()
    assert not EXTERNAL.search(html_text), "the report loads something from outside itself"
    summary = json.loads((demo_run / run_files.SUMMARY).read_text())

    dumped = chromium(page, tmp_path, "--dump-dom")
    assert dumped.returncode == 0, dumped.stderr[-3000:]
    dom = Dom(dumped.stdout)
    assert not dom.texts.get("script-errors", "").strip(), dom.texts["script-errors"]
    assert "data-script-errors" not in dom.body
    plots = dom.plots()
    assert DEMO_PLOTS <= plots and plots & WAIT_PLOTS, f"plots in the rendered page: {plots}"
    assert dom.body.get("data-rendered") == str(len(dom.find("svg", class_="plot")))
    assert dom.texts.get("render-status", "").startswith("report rendered:")
    lanes = [a for a in dom.find("text") if "lane-label" in (a.get("class") or "")]
    assert len(lanes) == summary["ranks"]
    assert len(dom.find("tr")) >= summary["ranks"] + 1
    verdict_text = dom.texts.get("verdict", "")
    assert summary["verdict"] in verdict_text.lower() and summary["summary"] in verdict_text

    png = tmp_path / "report.png"
    shot = chromium(page, tmp_path, f"--screenshot={png}", "--window-size=1400,2400")
    assert shot.returncode == 0 and png.is_file(), shot.stderr[-3000:]
    width, height, bpp, rows = read_png(png)
    assert (width, height) == (1400, 2400)
    counts = color_counts(rows, bpp)
    background = max(counts.values())
    assert background < 0.9 * width * height, "the screenshot is (nearly) one color: blank"
    assert len(counts) > 100, f"only {len(counts)} colors: blank or unstyled page"
    # the plots painted: the phase lanes (running, paused) and the per-rank series colors
    for what, color in (("running lanes", theme.STATE_COLORS["running"]),
                        ("paused lanes", theme.STATE_COLORS["paused"]),
                        ("rank 0 series", theme.rank_color(0))):
        assert counts.get(rgb(color), 0) > 500, f"{what} ({color}) not on the screenshot"


@pytest.mark.browser
def test_script_error_check_can_fail(tmp_path):
    """Control: a page whose script throws is reported as such by the same DOM check."""
    page = report.build_report(tmp_path)
    broken = tmp_path / "broken.html"
    broken.write_text(page.read_text().replace(
        "</body>", "<script>undefinedFunction();</script></body>"))
    dom = Dom(chromium(broken, tmp_path, "--dump-dom").stdout)
    assert "undefinedFunction" in dom.texts.get("script-errors", "")
    assert dom.body.get("data-script-errors") == "yes"
