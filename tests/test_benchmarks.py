"""Smoke test of the benchmark tool: ``python -m benchmarks --quick`` runs and prints JSON lines.

Never asserts timings (the machines are noisy); only that the tool works and its output has
the documented shape.
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


def test_quick_benchmarks_print_json_lines_with_the_required_keys():
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines, "no output"
    names = set()
    for line in lines:
        record = json.loads(line)
        assert isinstance(record, dict), line
        for key in REQUIRED:
            assert key in record, f"{key} missing in {line}"
        assert "value" in record or ("baseline" in record and "instrumented" in record), line
        if record.get("baseline") and record.get("instrumented") is not None:
            assert "ratio" in record, f"ratio missing in {line}"
        names.add(record["name"])
    assert not any(name.endswith(".error") for name in names), names
    for section in ("overhead.", "detection.", "pause_latency.sim.", "scale.", "exporter_down."):
        assert any(name.startswith(section) for name in names), f"no {section}* figure"
