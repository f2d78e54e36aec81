"""A real vLLM DP=2 deployment over two hosts (network namespaces), one rank per host, our
plugin on both: the upstream staggered-barrier scenario passes across the bridge, and a
frozen engine on the second host is named "unresponsive" by the doctor run on the monitor
host while its peer waits for it (in ``sync_dp_state``, or in the MoE layer's DP all-gather
of its next forward); after SIGCONT the group recovers.
One deployment for the module (two engine cores, ~40 s to start)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from instrumented_core.doctor import DoctorReport, run_doctor
from instrumented_core.scrape import scrape_all
from instrumented_core.telemetry import names as n
from tests.multihost_vllm import TwoHostVllm
from tests.netns import Lab, inside, module_lab

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def lab():
    with module_lab(2) as made:
        yield made


@pytest.fixture(scope="module")
def deployment(lab, tmp_path_factory):
    dep = TwoHostVllm(lab, tmp_path_factory.mktemp("two-host-vllm"), cpu_timeout=120)
    try:
        dep.start()
        assert dep.call("warmup", timeout=120)["tokens"] == [4, 4]
        yield dep
    finally:
        dep.close()


def doctor_until(lab: Lab, targets: list[str], accept, timeout: float) -> DoctorReport:
    deadline = time.monotonic() + timeout
    while True:
        with inside(lab.monitor):
            report = run_doctor(targets)
        if accept(report):
            return report
        assert time.monotonic() < deadline, report.render()
        time.sleep(0.3)


def test_staggered_barrier_scenario_passes_across_hosts_with_our_plugin(lab, deployment):
    with inside(lab.monitor):
        before = scrape_all(deployment.targets, timeout=5.0)
    assert [s.reachable for s in before] == [True, True], [s.error for s in before]
    assert [s.engine for s in before] == [0, 1]
    assert all(s.get(n.PLUGIN_ACTIVE, None) == 1 for s in before), "plugin not active"
    out = deployment.call("staggered", timeout=180, gap=3.0)
    # the request routed to rank 1 between the staggered barriers completes (all its tokens)
    assert out["is_paused"] is True and out["routed"] == "completed", out
    with inside(lab.monitor):
        after = scrape_all(deployment.targets, timeout=5.0)
    for b, a in zip(before, after):
        assert a.sum(n.PAUSE_REQUESTS_TOTAL) > b.sum(n.PAUSE_REQUESTS_TOTAL), a.target
    report = doctor_until(lab, deployment.targets, lambda r: r.verdict.healthy, 30)
    assert report.exit_code == 0


def test_a_frozen_engine_on_the_second_host_is_unresponsive_and_recovers(lab, deployment):
    deployment.call("traffic_on", max_tokens=32)
    pid = deployment.engine_core_pid(1)
    os.kill(pid, signal.SIGSTOP)
    try:
        report = doctor_until(
            lab, deployment.targets,
            lambda r: r.verdict.kind == "stuck" and (
                "rank 0 waits for it in sync_dp_state" in r.verdict.summary
                or "rank 0 waits for it in a step (its workers in the model collective"
                in r.verdict.summary), 60)
        text = report.render()
        assert report.verdict.culprits == [1] and report.verdict.victims == [0], text
        assert (f"rank 1 unreachable: unresponsive (connects, never answers) (host "
                f"{lab.hosts[1].address})") in text
    finally:
        os.kill(pid, signal.SIGCONT)
    doctor_until(lab, deployment.targets, lambda r: r.verdict.healthy, 60)
    finished = deployment.call("traffic_off", timeout=180)["finished"]
    assert finished and set(finished) <= {"length", "stop"}, finished
