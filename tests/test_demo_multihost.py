"""``instrumented-core demo --hosts 2``, run as a user runs it: the CPU cluster's ranks on two
"hosts" (network namespaces on one bridge), the story read across the bridge.

Two demos run at once (one rank per host, a 4 s story). The first runs to its verdict: each
rank served on its own host's address (port base + global rank), the staggered barrier and
the pause passed, the stalled rank is named by the doctor reading across the bridge, the run
files are written, and nothing is left: no namespace of that run, no process. The second gets
SIGTERM mid-story: exit 128 + 15, the summary says so, and its namespaces are gone too.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from instrumented_core.cluster.netns import PREFIX, namespaces_left
from instrumented_core.stopping import alive, descendants
from tests.helpers import wait_until

pytestmark = pytest.mark.cluster

DEMO = [sys.executable, "-m", "instrumented_core.cli", "demo", "--no-live", "--hosts", "2",
        "--ranks", "2", "--seed", "7"]


def read_until(proc: subprocess.Popen, words: str, timeout: float) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while not any(words in line for line in lines):
        line = proc.stdout.readline()
        assert line and time.monotonic() < deadline, (
            f"the demo never printed {words!r}:\n{''.join(lines)}"
            f"{proc.stderr.read() if proc.poll() is not None else ''}")
        lines.append(line)
    return lines


def test_the_demo_over_two_hosts_names_the_stalled_rank_and_leaves_nothing(tmp_path):
    full_out, term_out = tmp_path / "full", tmp_path / "term"
    full = subprocess.Popen([*DEMO, "--duration", "4", "--fault", "stall", "--fault-rank", "1",
                             "--out", str(full_out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    term = subprocess.Popen([*DEMO, "--duration", "60", "--fault", "none", "--out",
                             str(term_out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        full_lines = read_until(full, "traffic for", 120)
        full_tree = descendants(full.pid)
        assert len(full_tree) >= 3, full_tree  # 2 ranks and the coordinator
        # SIGTERM mid-story: once the story is under way on both hosts
        lines = read_until(term, "traffic for", 120)
        tree = descendants(term.pid)
        assert len(namespaces_left(f"{PREFIX}{term.pid}-")) == 3  # monitor + 2 hosts
        term.send_signal(signal.SIGTERM)
        _, term_err = term.communicate(timeout=60)
        assert term.returncode == 128 + signal.SIGTERM, term_err
        assert "stopped by SIGTERM" in term_err.strip().splitlines()[-1], term_err
        assert wait_until(lambda: not any(alive(p) for p in tree), 15), "processes survived"
        assert namespaces_left(f"{PREFIX}{term.pid}-") == []
        summary = json.loads((term_out / "summary.json").read_text())
        assert summary["stopped_by"] == "SIGTERM" and summary["verdict"] == "no_verdict"
        assert any(line.startswith("ask the doctor: ip netns exec ") for line in lines), lines

        rest, stderr = full.communicate(timeout=150)
        stdout = "".join(full_lines) + rest
    finally:
        for proc in (full, term):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)
    assert full.returncode == 0, stdout[-2000:] + stderr[-2000:]
    assert "Traceback" not in stdout + stderr
    summary = json.loads((full_out / "summary.json").read_text())
    # each rank on its own host's address, port base + global rank (as on one host)
    addresses = [h["address"] for h in summary["hosts"]]
    assert len(set(addresses)) == 2 and [h["ranks"] for h in summary["hosts"]] == [[0], [1]]
    assert summary["metrics_urls"] == [f"http://{addresses[0]}:8100/metrics",
                                       f"http://{addresses[1]}:8101/metrics"]
    for rank, url in enumerate(summary["metrics_urls"]):
        assert f"rank {rank} metrics: {url}" in stdout
    # the story's verdicts, read across the bridge
    assert "barrier on all engines, then resume" in stdout
    assert summary["pauses"] == 1 and all(summary["sync_rounds"])
    assert (summary["verdict"], summary["culprit_ranks"]) == ("stuck", [1])
    assert (full_out / "report.html").stat().st_size > 1000
    # how to reach the ranks while it ran; nothing left once it ended
    monitor = re.search(r"\(netns (icnet-\d+-[0-9a-f]+-mon)\)", stdout)
    assert monitor and f"ip netns exec {monitor[1]} curl -s {summary['metrics_urls'][0]}" \
        in stdout
    assert namespaces_left(f"{PREFIX}{full.pid}-") == []
    assert wait_until(lambda: not any(alive(p) for p in full_tree), 15), "processes survived"
