"""DP 4 over two "hosts" (network namespaces on one bridge): Gloo over the bridge, each rank's
/metrics on its host's address, the doctor run from the monitor host, and real network and
process faults. One cluster for the module; the faults run in order and each is undone
before the next, SIGKILL last.

What each fault does to the ranks (read off these runs, written down in docs/ops.md):
a partition shorter than the Gloo timeout is survived (TCP retransmits once the link is back,
the sync rounds go on); a frozen process holds its peers inside ``sync_dp_state`` until
SIGCONT; a killed rank's peers fail their all-reduce at once (connection reset), long before
the Gloo timeout.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from instrumented_core.cluster import Cluster, ClusterConfig
from instrumented_core.doctor import DoctorReport, run_doctor
from instrumented_core.telemetry import TelemetryConfig
from tests.netns import PREFIX, Lab, inside, module_lab, namespaces_left

pytestmark = pytest.mark.cluster

RANKS = 4
PORT_BASE = 8100


@pytest.fixture(scope="module")
def lab():
    with module_lab(2) as made:
        yield made


@pytest.fixture(scope="module")
def cluster(lab, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multihost")
    cfg = ClusterConfig(ranks=RANKS, sync_interval=16, hang_timeout=60, collective_timeout=60,
                        hosts=lab.rank_hosts(RANKS),
                        telemetry=TelemetryConfig(metrics_port_base=PORT_BASE,
                                                  spans_file=str(tmp / "spans.jsonl")))
    with Cluster(cfg) as c:
        yield c


def targets(cluster: Cluster) -> list[str]:
    return [u.split("//", 1)[1].split("/", 1)[0] for u in cluster.metrics_urls if u]


def doctor(lab: Lab, cluster: Cluster) -> DoctorReport:
    with inside(lab.monitor):
        return run_doctor(targets(cluster))


def wait_for(lab: Lab, cluster: Cluster, kind: str, timeout: float = 30.0) -> DoctorReport:
    deadline = time.monotonic() + timeout
    while True:
        report = doctor(lab, cluster)
        if report.verdict.kind == kind:
            return report
        if time.monotonic() > deadline:
            pytest.fail(f"doctor did not say {kind} within {timeout} s; last:\n"
                        f"{report.render()}")
        time.sleep(0.3)


def held(summary: str) -> set[int]:
    """The live ranks the summary says wait for the ranks that do not answer."""
    if "stopped stepping:" not in summary:
        return set()
    tail = summary.split("stopped stepping:", 1)[1]
    return {int(r) for group in re.findall(r"\branks? ([\d, ]+) waits?", tail)
            for r in group.replace(",", " ").split()}


def wait_held(lab: Lab, cluster: Cluster, ranks: set[int], timeout: float = 20.0):
    """Until the doctor says every one of ``ranks`` waits for the silent ones: in sync_dp_state
    or, when the fault struck between two sync rounds, in the cross-rank model collective of
    their next step (the cluster models DP+EP: every step has one, as vLLM's MoE layers'
    DP all-gather; which one the peers block in first is down to timing)."""
    deadline = time.monotonic() + timeout
    while True:
        report = doctor(lab, cluster)
        summary = report.verdict.summary
        if held(summary) == ranks and ("in sync_dp_state" in summary
                                       or "in the model collective all_reduce" in summary):
            return report
        assert time.monotonic() < deadline, report.render()
        time.sleep(0.3)


def busy(cluster: Cluster, tokens: int = 10**7) -> list:
    return [cluster.generate(tokens, rank=r) for r in range(RANKS)]


def abort_busy(cluster: Cluster, handles: list) -> None:
    """End what :func:`busy` started, proving the group works again: an abort pause aborts
    every request, and the resume leaves the module's cluster ready for the next test."""
    cluster.pause("abort")
    assert [h.result(30) for h in handles] == ["aborted"] * RANKS
    cluster.resume()


def test_ranks_serve_on_their_hosts_and_sync_over_the_bridge(lab, cluster):
    assert [t.rsplit(":", 1) for t in targets(cluster)] == [
        [lab.hosts[0].address, "8100"], [lab.hosts[0].address, "8101"],
        [lab.hosts[1].address, "8102"], [lab.hosts[1].address, "8103"]]
    handles = busy(cluster, 300)
    assert [h.result(60) for h in handles] == ["completed"] * RANKS
    cluster.pause("keep")
    report = doctor(lab, cluster)
    assert report.verdict.kind == "paused", report.render()
    cluster.resume()
    # the doctor as a user runs it on the monitor host: the CLI inside the monitor namespace
    result = subprocess.run(lab.exec_argv(lab.monitor, [
        sys.executable, "-c", "from instrumented_core.cli import main; main()", "doctor", "--targets",
        ",".join(targets(cluster))]), capture_output=True, text=True, timeout=60,
        env={**os.environ})
    assert result.returncode == 0 and result.stdout.startswith("HEALTHY"), result.stdout


def test_monitor_cut_off_one_host_is_unobserved_not_stuck(lab, cluster):
    handles = busy(cluster)
    host = lab.hosts[1]
    lab.cut_monitor(host)
    try:
        report = wait_for(lab, cluster, "unobserved")
        assert report.verdict.culprits == [2, 3]
        assert f"host {host.address}" in report.verdict.summary
        assert "keep stepping" in report.verdict.summary
        assert report.exit_code == 4
    finally:
        lab.restore_monitor(host)
    wait_for(lab, cluster, "healthy")
    abort_busy(cluster, handles)


def test_partition_of_a_host_names_it_and_the_peers_waiting_in_sync(lab, cluster):
    handles = busy(cluster)
    host = lab.hosts[1]
    lab.partition(host)
    try:
        wait_for(lab, cluster, "stuck")
        report = wait_held(lab, cluster, {0, 1})
        text = report.render()
        assert report.verdict.culprits == [2, 3] and report.verdict.victims == [0, 1], text
        assert (f"ranks 2, 3 unreachable: no connection from the monitor (host "
                f"{host.address})") in text
        assert report.exit_code == 2
    finally:
        lab.heal(host)
    # shorter than the Gloo timeout: TCP retransmits, the round completes, the group goes on
    wait_for(lab, cluster, "healthy", timeout=60)
    assert all(cluster.alive())
    abort_busy(cluster, handles)


def test_a_frozen_rank_is_unresponsive_then_recovers(lab, cluster):
    handles = busy(cluster)
    pid = cluster.pids[3]
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lab, cluster, "stuck")
        report = wait_held(lab, cluster, {0, 1, 2})
        text = report.render()
        assert report.verdict.culprits == [3] and report.verdict.victims == [0, 1, 2], text
        assert "rank 3 unreachable: unresponsive (connects, never answers)" in text
        assert "not dead" in text and "healthy" not in text.lower()
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lab, cluster, "healthy", timeout=30)
    abort_busy(cluster, handles)


def test_a_killed_rank_on_the_second_host_is_down(lab, cluster):
    busy(cluster)
    os.kill(cluster.pids[3], signal.SIGKILL)
    report = wait_for(lab, cluster, "stuck")
    text = report.render()
    assert report.verdict.culprits == [3], text
    assert f"rank 3 unreachable: down (connection refused) (host {lab.hosts[1].address})" \
        in text


def test_the_lab_is_removed_on_failure_and_a_killed_run_is_swept():
    lab = Lab(2)
    with pytest.raises(RuntimeError, match="boom"), lab:
        assert len(namespaces_left(lab.tag)) == 3  # monitor + 2 hosts
        raise RuntimeError("boom")
    assert namespaces_left(lab.tag) == []
    # a run killed before its clean-up: its namespace names a pid that no longer exists
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{PREFIX}{dead.pid}-beef-mon"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        with Lab(2):
            assert namespaces_left(stale) == []
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True)
