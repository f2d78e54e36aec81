"""Flight recorder (issue 14) on the real CPU cluster: real rank processes, real Gloo.

- vLLM #36594 with the legacy one-phase pause: each rank's watchdog dumps on its own, and the
  analysis of the dump directory names the first divergent DP collective (rank 0's barrier,
  which the woken rank never entered) and the START_DP_WAVE that woke it;
- a stalled rank, then killed: its dump (written before its death) is in the bundle, and the
  analysis names it the culprit with its stack at the stall;
- the randomized schedules and a normal pause with a staggered barrier: zero dumps, and every
  rank's DP collective sequence number (``vllm_dp_collective_sequence``) agrees.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from instrumented_core.cluster import Cluster, ClusterConfig, CollectiveHang
from instrumented_core.flight_analysis import analyze, load_dumps
from instrumented_core.scenarios import upstream_deadlock_scenario
from instrumented_core.scrape import scrape_all
from instrumented_core.telemetry import TelemetryConfig
from instrumented_core.telemetry import names as n
from instrumented_core_testing.schedules import check_schedule, run_random_schedule

pytestmark = pytest.mark.cluster

WATCHDOG_SECONDS = 2.0


def config(tmp_path: Path, ranks: int, protocol: str = "two-phase", watchdog: float | None
           = WATCHDOG_SECONDS, **kw) -> ClusterConfig:
    tel = TelemetryConfig(metrics_port_base=0, spans_file=str(tmp_path / "spans.jsonl"),
                          watchdog_seconds=watchdog)
    return ClusterConfig(ranks=ranks, protocol=protocol, telemetry=tel, **kw)


def dumps_in(directory: Path) -> list[Path]:
    return sorted(directory.glob("flight-rank*.json")) if directory.is_dir() else []


def wait_for_dumps(directory: Path, ranks: set[int], timeout: float) -> list[Path]:
    deadline = time.monotonic() + timeout
    while True:
        files = dumps_in(directory)
        have = {int(f.name[len("flight-rank"):][:4]) for f in files}
        if ranks <= have:
            return files
        if time.monotonic() > deadline:
            raise AssertionError(f"no hang dump from ranks {sorted(ranks - have)} within "
                                 f"{timeout} s; dumps: {[f.name for f in files]}")
        time.sleep(0.1)


def test_legacy_deadlock_dumps_name_the_barrier_and_the_waking_start_dp_wave(tmp_path):
    cfg = config(tmp_path, 2, "legacy", hang_timeout=4, collective_timeout=30)
    flight = cfg.telemetry.flight_dump_dir
    with Cluster(cfg) as cluster:
        with pytest.raises(CollectiveHang):
            upstream_deadlock_scenario(cluster, first_wait=0.5, second_wait=1.0)
        wait_for_dumps(flight, {0, 1}, 10)
        seqs = [s.get(n.DP_COLLECTIVE_SEQ) for s in scrape_all(cluster.metrics_urls)]
        dumped = [s.get(n.FLIGHT_DUMPS_TOTAL) for s in scrape_all(cluster.metrics_urls)]
    assert seqs[0] == seqs[1] + 1, seqs  # rank 0 entered one DP collective more: the barrier
    assert dumped == [1.0, 1.0]  # one dump per rank per incident
    result = analyze(load_dumps(flight))
    text = result.render()
    assert result.divergence.startswith(f"DP collective #{int(seqs[0])}: rank 0 in barrier; "
                                        "rank 1 never entered it (inside step"), text
    assert result.culprits == [1] and result.victims == [0], text
    assert "START_DP_WAVE" in result.cause and "by rank 1" in result.cause
    assert any("_model_step" in line for line in result.stacks[1]), text


def test_stalled_then_killed_rank_its_dump_is_in_the_bundle_with_its_stack(tmp_path):
    cfg = config(tmp_path, 2, hang_timeout=20, collective_timeout=60)
    flight = cfg.telemetry.flight_dump_dir
    with Cluster(cfg) as cluster:
        handles = [cluster.generate(100_000, rank=r) for r in range(2)]
        cluster.inject_fault(1, "stall")
        wait_for_dumps(flight, {0, 1}, 15)
        os.kill(cluster.pids[1], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while cluster.alive()[1]:
            assert time.monotonic() < deadline, "rank 1 survived SIGKILL"
            time.sleep(0.05)
        # the on-call command: the live verdict, and every dump with its analysis, in one file
        bundle = tmp_path / "incident.tar.gz"
        targets = ",".join(u.removeprefix("http://").removesuffix("/metrics")
                           for u in cluster.metrics_urls)
        run = subprocess.run([sys.executable, "-m", "instrumented_core.cli", "doctor",
                              "--targets", targets, "--bundle", str(bundle), "--flight-dir",
                              str(flight)], capture_output=True, text=True, timeout=60)
        del handles
    assert run.returncode == 2, run.stdout + run.stderr  # stuck
    assert "2 hang dumps" in run.stderr and "first divergence: DP collective" in run.stdout
    with tarfile.open(bundle) as tar:
        names = set(tar.getnames())
    assert {"doctor.txt", "doctor.json", "analysis.txt"} <= names
    assert sum(name.startswith("dumps/flight-rank0001-") for name in names) == 1  # the dead one
    result = analyze(load_dumps(bundle))
    text = result.render()
    assert result.culprits == [1] and result.victims == [0], text
    assert "rank 0 in sync_dp_state" in result.divergence, text
    assert "rank 1 never entered it (in no collective" in result.divergence, text
    assert any("_stall" in line for line in result.stacks[1]), text
    assert result.cause == ""  # no START_DP_WAVE woke anyone


def test_randomized_schedules_and_a_normal_staggered_pause_leave_no_dump(tmp_path):
    cfg = config(tmp_path / "random", 3, watchdog=3.0, hang_timeout=15)
    with Cluster(cfg) as cluster:
        for seed in (1, 2):
            check_schedule(cluster, run_random_schedule(cluster, seed, episodes=2))
        seqs = {s.get(n.DP_COLLECTIVE_SEQ) for s in scrape_all(cluster.metrics_urls)}
        assert len(seqs) == 1 and seqs.pop() > 0  # no divergence, collectives were numbered
    assert dumps_in(cfg.telemetry.flight_dump_dir) == []
    # the rank waits ~3 s in the staggered barrier: normal, under the default threshold
    cfg = config(tmp_path / "normal", 2, watchdog=None, hang_timeout=15)
    with Cluster(cfg) as cluster:
        assert upstream_deadlock_scenario(cluster) == "completed"
        seqs = {s.get(n.DP_COLLECTIVE_SEQ) for s in scrape_all(cluster.metrics_urls)}
        assert len(seqs) == 1
    assert dumps_in(cfg.telemetry.flight_dump_dir) == []
