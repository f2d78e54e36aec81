"""The README's figures, generated from their sources instead of written by hand.

    python -m benchmarks.table results.jsonl     # a benchmark run as a markdown table
    python -m benchmarks.table --readme          # rewrite the README's generated figures
    python -m benchmarks.table --readme --check  # fail (exit 1) when they are stale

Two regions of README.md, each between ``<!-- figures:NAME begin -->`` and ``<!-- figures:NAME
end -->``, are written by ``--readme``: ``benchmarks``, the table of
``benchmarks/latest.jsonl`` (the committed JSON lines of the last benchmark run), and
``suite``, the suite's size from pytest's own collection (fast layer = no real-process marker)
and its time from ``.ci/last-run.json`` (what ``.ci/test`` measured on its last full run).
Stage 1 of ``.ci/test`` runs ``--check``, so a stale README fails in seconds.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
LATEST = ROOT / "benchmarks" / "latest.jsonl"
LAST_RUN = ROOT / ".ci" / "last-run.json"
#: markers that put a test in stage 2 (real processes); every other test is the fast layer
REAL_PROCESS_MARKERS = ("cluster", "prometheus", "vllm", "browser", "slow", "network")


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 1:
            return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
        return f"{v:.3g}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, list):
        return ", ".join(map(str, v))
    return str(v)


def render(records: list[dict]) -> str:
    rows = ["| figure | baseline | instrumented / value | ratio | unit | goal met |",
            "| --- | ---: | ---: | ---: | --- | --- |"]
    for r in records:
        if r["name"] == "benchmarks.wall_seconds":
            continue
        value = r.get("instrumented") if "instrumented" in r else r.get("value")
        goal = _fmt(r["goal_met"]) if "goal_met" in r else ""
        rows.append(f"| `{r['name']}` | {_fmt(r.get('baseline'))} | {_fmt(value)} | "
                    f"{_fmt(r.get('ratio'))} | {r.get('unit', '')} | {goal} |")
    return "\n".join(rows) + "\n"


def collect_suite() -> tuple[int, int]:
    """(all tests, fast-layer tests) as pytest collects them now."""
    import pytest

    class Count:
        total = fast = 0

        def pytest_collection_modifyitems(self, items: list) -> None:
            Count.total = len(items)
            Count.fast = sum(not any(item.get_closest_marker(m) for m in REAL_PROCESS_MARKERS)
                             for item in items)

    with contextlib.redirect_stdout(io.StringIO()) as said:
        code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider",
                            str(ROOT / "tests")], plugins=[Count()])
    if code != 0:
        sys.stderr.write(said.getvalue()[-3000:])
    if code != 0:
        raise SystemExit(f"benchmarks.table: pytest could not collect the suite (exit {code})")
    return Count.total, Count.fast


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def render_suite(total: int, fast: int, last_run: dict) -> str:
    return textwrap.fill(
            f"The suite has {total} tests: {fast} in the fast stage and {total - fast} with "
            f"real processes (rank processes and Gloo collectives, Prometheus, Alertmanager, "
            f"Chromium, real vLLM DP=2 engines, the checks against every released vLLM wheel). "
            f"Its last recorded full run (`.ci/test`, {last_run['where']}) took "
            f"{_duration(last_run['stage1_seconds'] + last_run['stage2_seconds'])}: stage 1 "
            f"{_duration(last_run['stage1_seconds'])}, stage 2 "
            f"{_duration(last_run['stage2_seconds'])}.", width=95) + "\n"


def regions() -> dict[str, str]:
    """Each generated README region's text, from its source."""
    records = [json.loads(line) for line in LATEST.read_text().splitlines() if line.strip()]
    total, fast = collect_suite()
    return {"benchmarks": render(records),
            "suite": render_suite(total, fast, json.loads(LAST_RUN.read_text()))}


def rewrite(text: str, generated: dict[str, str]) -> str:
    for name, body in generated.items():
        pattern = re.compile(rf"(<!-- figures:{name} begin -->\n)(.*?)(<!-- figures:{name} end -->)",
                             re.S)
        if not pattern.search(text):
            raise SystemExit(f"benchmarks.table: README.md has no figures:{name} markers")
        text = pattern.sub(lambda m: m.group(1) + body + m.group(3), text)
    return text


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--readme":
        current = README.read_text()
        wanted = rewrite(current, regions())
        if "--check" in argv[1:]:
            if wanted != current:
                print("README.md's generated figures are stale: run python -m benchmarks.table "
                      "--readme and commit README.md", file=sys.stderr)
                return 1
            print("README figures up to date (benchmarks/latest.jsonl, suite size and time)")
            return 0
        README.write_text(wanted)
        return 0
    path = argv[0] if argv else "-"
    stream = sys.stdin if path == "-" else open(path)
    records = [json.loads(line) for line in stream if line.strip()]
    sys.stdout.write(render(records))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
