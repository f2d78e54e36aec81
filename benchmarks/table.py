"""Render benchmark JSON lines as the markdown table in the README.

    python -m benchmarks > results.jsonl && python -m benchmarks.table results.jsonl
"""

from __future__ import annotations

import json
import sys


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


def main(argv: list[str]) -> int:
    path = argv[0] if argv else "-"
    stream = sys.stdin if path == "-" else open(path)
    records = [json.loads(line) for line in stream if line.strip()]
    sys.stdout.write(render(records))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
