"""Smoke test of the benchmark tool: ``python -m benchmarks --quick`` runs and prints JSON lines.

Never asserts timings (the machines are noisy); only that the tool works, its output has the
documented shape, and every goal's verdict follows from the figures printed with it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = ("name", "unit")


@pytest.fixture(scope="module")
def quick_records() -> list[dict]:
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick"], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines, "no output"
    records = [json.loads(line) for line in lines]
    for line, record in zip(lines, records):
        assert isinstance(record, dict), line
    return records


def test_quick_benchmarks_print_json_lines_with_the_required_keys(quick_records):
    names = set()
    for record in quick_records:
        for key in REQUIRED:
            assert key in record, f"{key} missing in {record}"
        assert "value" in record or ("baseline" in record and "instrumented" in record), record
        if record.get("baseline") and record.get("instrumented") is not None:
            assert "ratio" in record, f"ratio missing in {record}"
        names.add(record["name"])
    assert not any(name.endswith(".error") for name in names), names
    for section in ("overhead.", "detection.", "pause_latency.sim.", "scale.", "exporter_down.",
                    "overhead.micro.step_wrapper_", "overhead.micro.worker_board_",
                    "overhead.micro.worker_hooks_per_forward", "overhead.scrape.worker_board_",
                    "overhead.gloo_allgather_"):
        assert any(name.startswith(section) for name in names), f"no {section}* figure"


@pytest.mark.parametrize("name, limit_us, fraction", [
    ("goal.step_wrapper_under_1pct_and_2us", 2.0, 0.01),
    ("goal.worker_board_per_model_collective_under_5pct_of_allgather_and_2us", 2.0, 0.05),
], ids=["step wrapper", "worker board per model collective"])
def test_the_hook_goals_are_computed_from_the_figures_printed_with_them(
        quick_records, name, limit_us, fraction):
    (goal,) = [r for r in quick_records if r["name"] == name]
    added, reference = goal["instrumented"], goal["baseline"]
    assert reference > 0
    assert goal["ratio"] == pytest.approx(added / reference, rel=1e-3)
    expected = added < limit_us and added < fraction * reference
    assert goal["goal_met"] is expected, goal
