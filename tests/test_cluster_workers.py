"""The CPU cluster's engine/worker split, read back by the doctor as an operator would.

Each rank's step is a call to its worker thread, which runs the model collective and
publishes its position on the worker board; the doctor reads it from the ranks' ``/metrics``.
Faults go on a random rank (``IC_SEED`` replays a run): a stopped or frozen worker is named
stuck, a slow worker slow, a wedge on every rank wedged (no culprit); a busy healthy cluster
and an idle one held past the doctor's threshold are healthy.
"""

from __future__ import annotations

import os
import random
import threading
import time

import pytest

from instrumented_core.cluster import Cluster, ClusterConfig, CollectiveHang
from instrumented_core.doctor import EXIT_OK, EXIT_SLOW, EXIT_STUCK, DoctorReport, run_doctor
from instrumented_core.scrape import to_view
from instrumented_core.telemetry import TelemetryConfig
from instrumented_core.telemetry import names as n
from instrumented_core.telemetry.worker_board import read_board

pytestmark = pytest.mark.cluster

THRESHOLD = 2.0  # the doctor's default: seconds inside a collective that count as waiting
VERDICT_WITHIN = 15.0  # threshold + a few doctor rounds, with room for a loaded machine


@pytest.fixture(scope="module")
def rng():
    seed = int(os.environ.get("IC_SEED", random.randrange(1 << 30)))
    print(f"test_cluster_workers seed {seed} (replay with IC_SEED={seed})")
    return random.Random(seed)


def start(ranks: int, **kw) -> Cluster:
    kw.setdefault("hang_timeout", 20.0)
    config = ClusterConfig(ranks=ranks, telemetry=TelemetryConfig(metrics_port_base=0), **kw)
    return Cluster(config).start()


def targets_of(cluster: Cluster) -> list[str]:
    return [u for u in cluster.metrics_urls if u]


def wait_for_verdict(cluster: Cluster, kind: str, culprits: list[int],
                     timeout: float = VERDICT_WITHIN) -> DoctorReport:
    """Poll the doctor until it says ``kind`` naming ``culprits``; fail with the last verdict."""
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        report = run_doctor(targets=targets_of(cluster), threshold=THRESHOLD)
        v = report.verdict
        if not seen or seen[-1] != (v.kind, v.culprits):
            seen.append((v.kind, v.culprits))
        if v.kind == kind and v.culprits == culprits:
            return report
        if time.monotonic() > deadline:
            pytest.fail(f"no {kind} {culprits} within {timeout:.0f} s; verdicts seen: {seen}; "
                        f"last:\n{report.render()}")
        time.sleep(0.2)


class Traffic:
    """Requests at random ranks until stopped: the group always has work in flight."""

    def __init__(self, cluster: Cluster, rng: random.Random, tokens=(20, 60)) -> None:
        self.cluster, self.rng, self.tokens = cluster, rng, tokens
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.cluster.generate(self.rng.randint(*self.tokens))
            except Exception:  # noqa: BLE001 - the cluster is stopping
                return

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(2)


def test_a_stopped_worker_is_named_stuck_by_the_doctor_and_the_hang_report(rng):
    ranks = 3
    culprit = rng.randrange(ranks)
    cluster = start(ranks)
    try:
        for r in range(ranks):
            cluster.generate(400, rank=r)
        cluster.inject_fault(culprit, "worker_stall")
        report = wait_for_verdict(cluster, "stuck", [culprit])
        v = report.verdict
        assert v.victims == [r for r in range(ranks) if r != culprit]
        assert report.exit_code == EXIT_STUCK
        assert f"rank {culprit} (running): its worker is not in the model collective" in v.summary
        assert "waiting in all_reduce" in v.summary
        # the client's own hang report reads the same boards (status + worker) without HTTP
        with pytest.raises(CollectiveHang) as hang:
            cluster.stats(timeout=3.0)
        assert hang.value.verdict.kind == "stuck"
        assert hang.value.verdict.culprits == [culprit]
    finally:
        cluster.stop()


def test_a_frozen_worker_is_named_by_its_stopped_heartbeat(rng):
    ranks = 2
    culprit = rng.randrange(ranks)
    cluster = start(ranks)
    try:
        for r in range(ranks):
            cluster.generate(400, rank=r)
        cluster.inject_fault(culprit, "freeze")  # as SIGSTOP on a vLLM worker process
        report = wait_for_verdict(cluster, "stuck", [culprit])
        assert f"rank {culprit} (running): a worker frozen for" in report.verdict.summary
        assert "no heartbeat" in report.verdict.summary
    finally:
        cluster.stop()


def test_a_model_collective_that_times_out_in_the_worker_fails_its_engine_with_one_line():
    cluster = start(2, collective_timeout=2.0)
    try:
        cluster.inject_fault(1, "worker_stall")
        cluster.generate(50, rank=0)
        deadline = time.monotonic() + 20
        while not cluster.rank_errors:
            assert time.monotonic() < deadline, "rank 0's worker never timed out"
            time.sleep(0.05)
        error = cluster.rank_errors[0]
        assert error.startswith("rank 0 failed in the step collective after "), error
        assert "\n" not in error
    finally:
        cluster.stop()


def test_a_slow_worker_is_named_slow(rng):
    ranks = 3
    culprit = rng.randrange(ranks)
    cluster = start(ranks, slow_step_seconds=0.04)
    try:
        with Traffic(cluster, rng):
            cluster.inject_fault(culprit, "worker_slow")
            report = wait_for_verdict(cluster, "slow", [culprit])
        assert report.exit_code == EXIT_SLOW
        assert f"rank {culprit} is a straggler: its workers wait" in report.verdict.summary
        assert sorted(report.verdict.victims) == [r for r in range(ranks) if r != culprit]
    finally:
        cluster.stop()


def test_a_wedge_on_every_rank_is_wedged_with_no_culprit(rng):
    ranks = 2
    cluster = start(ranks)
    try:
        for r in range(ranks):
            cluster.generate(400, rank=r)
        cluster.inject_fault(None, "wedge")
        report = wait_for_verdict(cluster, "wedged", [])
        v = report.verdict
        assert v.culprits == [] and v.victims == [] and not v.healthy
        assert report.exit_code == EXIT_STUCK
        assert "workers inside all_reduce" in v.summary
        # every worker sits inside the same collective (the same sequence number)
        views = [to_view(s, r) for r, s in enumerate(report.samples)]
        assert {v.model_collective for v in views} == {"all_reduce"}
        assert len({v.model_collective_seq for v in views}) == 1
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def dp2():
    cluster = start(2)
    try:
        yield cluster
    finally:
        cluster.stop()


def test_a_busy_healthy_cluster_is_healthy_and_shows_its_workers(dp2, rng):
    with Traffic(dp2, rng, tokens=(100, 300)):  # each request lasts longer than a doctor run
        deadline = time.monotonic() + 10
        while not all(s["running"] + s["waiting"] for s in dp2.stats()):
            assert time.monotonic() < deadline, "traffic never reached every rank"
            time.sleep(0.05)
        reports = [run_doctor(targets=targets_of(dp2), threshold=THRESHOLD) for _ in range(3)]
    for report in reports:
        assert report.verdict.kind == "healthy", report.render()
        assert report.exit_code == EXIT_OK
        assert "idle" not in report.verdict.summary
        for sample in report.samples:
            workers = sample.by_label(n.WORKER_HEARTBEAT_AGE, n.LABEL_WORKER)
            assert list(workers) == ["0"]  # one worker per rank ...
            assert sample.get(n.WORKER_MODEL_COLLECTIVES_TOTAL) > 0  # ... stepping


def test_an_idle_cluster_held_past_the_threshold_is_healthy_and_idle(dp2):
    deadline = time.monotonic() + 20
    while any(s["engines_running"] or s["running"] + s["waiting"] for s in dp2.stats()):
        assert time.monotonic() < deadline, "the cluster never went idle"
        time.sleep(0.05)
    # read until every rank has gone longer than the threshold without progress; every
    # verdict on the way must be healthy and idle
    deadline = time.monotonic() + 3 * THRESHOLD + 10
    while True:
        report = run_doctor(targets=targets_of(dp2), threshold=THRESHOLD)
        assert report.verdict.kind == "healthy", report.render()
        assert "idle" in report.verdict.summary, report.render()
        views = [to_view(s, r) for r, s in enumerate(report.samples)]
        assert all(v.workers == 1 and v.worker_call is None for v in views)
        if all(v.progress_age > THRESHOLD for v in views):
            break
        assert time.monotonic() < deadline, f"progress ages: {[v.progress_age for v in views]}"
        time.sleep(0.5)


def test_a_stopped_cluster_leaves_no_worker_records():
    cluster = start(2)
    pids = list(cluster.pids)
    try:
        cluster.inject_fault(1, "dead")  # a rank that cannot remove its own record
        cluster.generate(5, rank=0)
        deadline = time.monotonic() + 10
        while cluster.alive()[1]:
            assert time.monotonic() < deadline, "the dead fault never ended rank 1"
            time.sleep(0.05)
        assert read_board(pids[0]), "rank 0's worker should still be on the board"
    finally:
        cluster.stop()
    assert [read_board(pid) for pid in pids] == [[], []]
