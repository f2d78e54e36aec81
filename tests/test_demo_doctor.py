"""`instrumented-core demo` and `instrumented-core doctor`, run as a user runs them."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from instrumented_core.cluster import Cluster, ClusterConfig
from instrumented_core.doctor import EXIT_OK, EXIT_SLOW, EXIT_STUCK, run_doctor
from instrumented_core.telemetry import TelemetryConfig
from instrumented_core.telemetry import names as n

pytestmark = pytest.mark.cluster

CLI = [sys.executable, "-m", "instrumented_core.cli"]


def run_cli(*args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, verdict, culprits", [
    (["--fault", "slow", "--fault-rank", "1"], "slow", [1]),
    (["--fault", "dead", "--fault-rank", "3"], "stuck", [3]),
    (["--fault", "none"], "healthy", []),
    (["--ranks", "3", "--fault", "stall", "--fault-rank", "1", "--sync-interval", "8"],
     "stuck", [1]),
    (["--protocol", "legacy", "--ranks", "2"], "deadlock", [1]),
    # the engine/worker split: a stopped worker, a slow worker, a wedge on every rank
    (["--ranks", "3", "--fault", "worker_stall", "--fault-rank", "2"], "stuck", [2]),
    (["--ranks", "2", "--fault", "worker_slow", "--fault-rank", "0"], "slow", [0]),
    (["--ranks", "2", "--fault", "wedge"], "wedged", []),
])
def test_demo_verdict_names_the_injected_fault(tmp_path, args, verdict, culprits):
    out = tmp_path / "out"
    result = run_cli("demo", "--no-live", "--duration", "4", "--seed", "7", "--out", str(out),
                     "--metrics-port-base", "0", *args)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"] == verdict
    assert summary["culprit_ranks"] == culprits
    assert summary["protocol"] == ("legacy" if "legacy" in args else "two-phase")
    assert summary["ranks"] == (int(args[args.index("--ranks") + 1]) if "--ranks" in args
                                else 4)
    if "wedge" in args:
        assert summary["fault_rank"] is None  # injected on every rank
    assert summary["pauses"] == 1 and len(summary["sync_rounds"]) == summary["ranks"]
    assert (out / "report.html").stat().st_size > 1000
    assert (out / "spans.jsonl").read_text().count(f'"{n.SPAN_PAUSE}"') >= 1
    assert "metrics: http://127.0.0.1:" in result.stdout
    assert f"verdict: {verdict}" in result.stdout
    page = (out / "report.html").read_text()
    if "legacy" in args:  # the hang left dumps; the page shows the flight-recorder analysis
        assert 'id="flight-verdict"' in page and "rank 0 in barrier" in page
        assert "START_DP_WAVE" in page
    if "none" in args:  # a normal run: pauses and a staggered barrier, no dump
        assert "No hang dumps" in page and not list((out / "flight").glob("*.json"))


def test_demo_exits_non_zero_with_one_line_when_the_story_goes_wrong(tmp_path):
    # a fault on a rank that does not exist is refused up front
    result = run_cli("demo", "--no-live", "--ranks", "2", "--fault-rank", "5",
                     "--out", str(tmp_path), "--metrics-port-base", "0")
    assert result.returncode == 2
    assert result.stdout.strip().splitlines()[-1].startswith("instrumented-core: error: "
                                                             "--fault-rank 5")


@pytest.mark.parametrize("args, message", [
    (["demo", "--ranks", "0"], "--ranks must be >= 1, got 0"),
    (["demo", "--sync-interval", "x"], "--sync-interval must be an integer"),
    (["demo", "--protocol", "three-phase"], "invalid choice: 'three-phase'"),
    (["demo", "--fault", "melt"], "invalid choice: 'melt'"),
    (["demo", "--metrics-port-base", "99999"], "port must be 0-65535"),
    (["doctor", "--targets", " , "], "--targets is empty"),
])
def test_bad_flags_are_one_line_errors(args, message):
    result = run_cli(*args, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_demo_port_in_use_is_a_one_line_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("demo", "--no-live", "--metrics-port-base", str(port),
                         "--out", str(tmp_path), timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"metrics port {port} on 127.0.0.1 (rank 0) is already in use" \
        in lines[0]


def telemetry(tmp_path) -> TelemetryConfig:
    return TelemetryConfig(metrics_port_base=0, spans_file=str(tmp_path / "spans.jsonl"),
                           debug_endpoint=True)


@pytest.fixture
def cluster4(tmp_path):
    with Cluster(ClusterConfig(ranks=4, hang_timeout=20, telemetry=telemetry(tmp_path))) as c:
        yield c


def targets_of(cluster: Cluster) -> list[str]:
    return [u.removeprefix("http://").removesuffix("/metrics") for u in cluster.metrics_urls]


def keep_busy(cluster: Cluster, seconds: float) -> None:
    for _ in range(int(seconds * 10)):
        cluster.generate(20)
        time.sleep(0.1)


def wait_for_verdict(targets, kind, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        report = run_doctor(targets=targets)
        if report.verdict.kind == kind or time.monotonic() > deadline:
            return report
        time.sleep(0.3)


def test_doctor_says_healthy_on_a_healthy_cluster_and_paused_when_paused(cluster4):
    keep_busy(cluster4, 1.0)
    targets = ",".join(targets_of(cluster4))
    result = run_cli("doctor", "--targets", targets, timeout=30)
    assert result.returncode == EXIT_OK, result.stdout
    assert result.stdout.startswith("HEALTHY")
    cluster4.pause("keep")
    result = run_cli("doctor", "--targets", targets, "--json", timeout=30)
    assert json.loads(result.stdout)["verdict"] == "paused" and result.returncode == EXIT_OK
    cluster4.resume()


def test_doctor_names_a_stalled_rank_and_shows_its_stack(cluster4):
    cluster4.inject_fault(2, "stall")
    cluster4.generate(40, rank=0)
    report = wait_for_verdict(targets_of(cluster4), "stuck")
    assert report.verdict.culprits == [2] and report.verdict.victims == [0, 1, 3]
    result = run_cli("doctor", "--targets", ",".join(targets_of(cluster4)), "--stacks",
                     timeout=30)
    assert result.returncode == EXIT_STUCK
    assert "culprit: rank 2" in result.stdout and "victims: rank 0, rank 1, rank 3" in result.stdout
    assert "never entered sync_dp_state" in result.stdout
    assert "in _stall" in result.stdout  # the engine thread's stack, from /debug/stacks


def test_doctor_names_a_slow_rank(cluster4):
    cluster4.inject_fault(1, "slow")
    keep_busy(cluster4, 1.0)
    report = wait_for_verdict(targets_of(cluster4), "slow")
    assert report.verdict.kind == "slow" and report.verdict.culprits == [1]
    assert report.exit_code == EXIT_SLOW


def test_doctor_names_a_dead_rank(cluster4):
    cluster4.inject_fault(3, "dead")
    cluster4.generate(10, rank=0)
    report = wait_for_verdict(targets_of(cluster4), "stuck")
    assert report.verdict.culprits == [3] and report.exit_code == EXIT_STUCK
    assert "rank 3 unreachable" in report.render()
