"""A rank wedged or slow inside a real forward step, on vLLM's real DP=2 engine (CPU).

One engine serves the module: every fault here is reversible (``SIGSTOP``/``SIGCONT`` of a
worker process, a test-only switch file that holds every worker inside a model collective, a
slow ``collective_rpc``), and after each one the engine must be healthy again with nothing
lost. The faulted rank is drawn at random (seeded; ``IC_SEED`` replays) so both ranks get
named over runs. Everything is read as an operator would: the doctor over each engine core's
``/metrics``, and a real Prometheus scraping both ranks with the shipped alert rules (the
frozen worker must fire ``VllmDpRankWedged`` naming its rank; the idle engine, held past every
alert threshold, must fire nothing, not even pending).

Fidelity: before the engine starts, the CPU reference cluster (DP=2, with its engine/worker
split) runs the same stories on the same ranks: a frozen worker, a slow worker, a wedge
inside the model collective on every rank, an idle group. Its verdict, taken as the first
non-healthy verdict the doctor repeats on two reads in a row (no expectation involved), must
be the one vLLM gets for the same story: the fast CPU tests stand for the real engine.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time

import pytest

from instrumented_core.telemetry import names as n

pytestmark = pytest.mark.vllm

SEED = int(os.environ.get("IC_SEED", str(time.time_ns() % 100_000)))
THRESHOLD = 2.0  # the doctor's default


@pytest.fixture(scope="module")
def rng():
    print(f"IC_SEED={SEED}")
    return random.Random(SEED)


@pytest.fixture(scope="module")
def ranks(rng):
    """The rank each story faults, shared by the CPU cluster and vLLM."""
    return {"freeze": rng.choice((0, 1)), "slow": rng.choice((0, 1))}


def _settled_verdict(targets: list[str], timeout: float = 20.0) -> tuple[str, list[int]]:
    """The first verdict the doctor gives twice in a row that is not healthy (or healthy
    twice in a row when ``timeout`` passes): what an operator would take as the answer."""
    from instrumented_core.doctor import run_doctor

    deadline = time.monotonic() + timeout
    last = None
    while True:
        v = run_doctor(targets=targets).verdict
        now = (v.kind, v.culprits)
        if now == last and (not v.healthy or time.monotonic() > deadline):
            return now
        if time.monotonic() > deadline + 10:
            raise TimeoutError(f"the doctor never settled; last said {now}")
        last = now


@pytest.fixture(scope="module")
def cpu_verdicts(ranks):
    """The stories on the CPU cluster, one fresh DP=2 cluster each (a stopped worker stays
    stopped), before any vLLM engine starts."""
    from instrumented_core.cluster import Cluster, ClusterConfig
    from instrumented_core.telemetry import TelemetryConfig

    def story(fault: str | None, rank: int | None, **config) -> tuple[str, list[int]]:
        cluster = Cluster(ClusterConfig(ranks=2, hang_timeout=20.0, telemetry=TelemetryConfig(
            metrics_port_base=0), **config)).start()
        stop = threading.Event()

        def traffic() -> None:  # requests on both ranks until the story ends
            while not stop.wait(0.05):
                try:
                    for r in (0, 1):
                        cluster.generate(60, rank=r)
                except Exception:  # noqa: BLE001 - the cluster is stopping
                    return

        thread = threading.Thread(target=traffic, daemon=True)
        try:
            targets = [u for u in cluster.metrics_urls if u]
            if fault is None:  # idle from its start, held past the doctor's threshold
                return _settled_verdict(targets, timeout=THRESHOLD * 2)
            thread.start()
            cluster.inject_fault(rank, fault)
            return _settled_verdict(targets)
        finally:
            stop.set()
            cluster.stop()
            if thread.is_alive():
                thread.join(5)

    return {
        "idle": story(None, None),
        "freeze": story("freeze", ranks["freeze"]),
        "slow": story("worker_slow", ranks["slow"], slow_step_seconds=0.04),
        "wedge": story("wedge", None),
    }


@pytest.fixture(scope="module")
def engine(tmp_path_factory, cpu_verdicts):
    from tests.vllm_helpers import PROMPTS, VllmEngine, generate

    wedge_file = tmp_path_factory.mktemp("wedge") / "armed"
    # callables as collective_rpc methods (the slow-RPC test) need vLLM's pickle fallback
    eng = VllmEngine({"IC_TEST_WEDGE_FILE": str(wedge_file),
                      "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}, cpu_timeout=120)
    eng.wedge_file = wedge_file
    try:
        eng.start()
        eng.wait_metrics(30)
        eng.run(asyncio.gather(*(generate(eng.llm, PROMPTS[r], max_tokens=4, dp_rank=r)
                                 for r in (0, 1))), 60, "warm-up")
        yield eng
    finally:
        for rank in (0, 1):  # never leave a worker stopped (SIGKILL would still work)
            try:
                eng.worker_process(rank).send_signal(signal.SIGCONT)
            except Exception:  # noqa: BLE001
                pass
        if wedge_file.exists():
            wedge_file.unlink()
        eng.close()


@pytest.fixture(scope="module")
def prom(engine, tmp_path_factory):
    from tests.prom_helpers import running_prometheus

    with running_prometheus(engine.metrics_urls, tmp_path_factory.mktemp("prom")) as server:
        yield server


def _kind(kind: str, culprits: list[int] | None = None):
    def accept(report) -> bool:
        v = report.verdict
        return v.kind == kind and (culprits is None or v.culprits == culprits)
    return accept


async def _healthy_again(engine) -> None:
    from tests.vllm_helpers import doctor_until

    await doctor_until(engine.targets, lambda r: r.verdict.kind == "healthy", 30,
                       "healthy again")


IDLE_HOLD = 30.0  # past the wedge alerts' 10 s threshold + for: 15s, and the doctor's 2 s


def test_a_whole_vllm_rank_at_tp_1_serves_at_most_60_series_its_worker_included(engine):
    """Issue 13's budget on the real engine cores' endpoints (TP 1: one worker each), after
    traffic: the rank's own series plus its worker's, counted as served."""
    from benchmarks.scale import MAX_RANK_SERIES, count_series, fetch_text

    for url in engine.metrics_urls:
        counted = count_series(fetch_text(url))
        assert counted["workers"] == 1, (url, counted)
        assert counted["worker_series"] == len(n.WORKER_PER_WORKER_SERIES +
                                               n.WORKER_RANK_SERIES), counted["families"]
        assert counted["created"] == 0 and counted["total"] <= MAX_RANK_SERIES, \
            (url, counted["total"], counted["families"])


def test_an_idle_engine_held_past_every_threshold_is_healthy_idle_and_fires_nothing(
        engine, prom, cpu_verdicts):
    from tests.vllm_helpers import doctor_until

    async def scenario():
        # idle: nobody has requests, and nothing has progressed for longer than every threshold
        def idle_long(report) -> bool:
            verdict = report.verdict
            return verdict.kind == "healthy" and "idle" in verdict.summary and all(
                time.time() - (s.get(n.LAST_PROGRESS) or 0)
                > IDLE_HOLD for s in report.samples)
        report, _ = await doctor_until(engine.targets, idle_long, IDLE_HOLD + 30,
                                       "idle past every threshold")
        return report

    report = engine.run(scenario(), IDLE_HOLD + 60, "idle")
    assert report.exit_code == 0
    assert report.verdict.culprits == [], report.render()
    assert cpu_verdicts["idle"] == ("healthy", [])  # the CPU cluster agrees
    prom.assert_no_alerts()  # nothing fired or went pending while the engine sat idle


def test_a_frozen_worker_on_a_random_rank_is_named_alerted_and_sigcont_loses_nothing(
        engine, ranks, prom, cpu_verdicts):
    from tests.vllm_helpers import Traffic, doctor_until

    rank = ranks["freeze"]
    worker = engine.worker_process(rank)

    async def scenario():
        traffic = Traffic(engine.llm)
        try:
            await doctor_until(engine.targets, lambda r: "requests in flight" in
                               r.verdict.summary and r.verdict.kind == "healthy", 30,
                               "traffic on both ranks")
            frozen_at = time.monotonic()
            worker.send_signal(signal.SIGSTOP)
            try:
                report, seconds = await doctor_until(
                    engine.targets, _kind("stuck", [rank]), 20, f"rank {rank} named")
                loop = asyncio.get_running_loop()
                firing = await loop.run_in_executor(
                    None, lambda: prom.wait_for_alert("VllmDpRankWedged", timeout=90))
                alert_seconds = time.monotonic() - frozen_at
            finally:
                worker.send_signal(signal.SIGCONT)
            finished = await traffic.stop()
        except BaseException:
            traffic.cancel()
            raise
        await _healthy_again(engine)
        return report, seconds, finished, firing, alert_seconds

    report, seconds, finished, firing, alert_seconds = engine.run(scenario(), 240,
                                                                  "frozen worker")
    print(f"frozen worker of rank {rank} named after {seconds:.1f} s, alert firing after "
          f"{alert_seconds:.1f} s:\n{report.render()}")
    assert [a["engine"] for a in firing] == [str(rank)], firing  # the rank, not its peer
    assert cpu_verdicts["freeze"] == ("stuck", [rank])  # the CPU cluster's frozen worker
    text = report.render()
    assert f"culprit: rank {rank}" in text
    assert "frozen" in text
    assert report.verdict.victims == [1 - rank]
    assert report.exit_code == 2
    assert finished and set(finished) == {"length"}, finished  # nothing lost


def test_a_throttled_worker_on_a_random_rank_is_named_slow(engine, ranks, cpu_verdicts):
    from tests.vllm_helpers import Traffic, doctor_until

    rank = ranks["slow"]
    worker = engine.worker_process(rank)
    stop = threading.Event()

    def throttle() -> None:  # stopped 150 ms of every 200 ms
        while not stop.is_set():
            worker.send_signal(signal.SIGSTOP)
            stop.wait(0.15)
            worker.send_signal(signal.SIGCONT)
            stop.wait(0.05)

    async def scenario():
        traffic = Traffic(engine.llm)
        thread = threading.Thread(target=throttle, daemon=True)
        try:
            await doctor_until(engine.targets, lambda r: "requests in flight" in
                               r.verdict.summary, 30, "traffic on both ranks")
            thread.start()
            try:
                report, seconds = await doctor_until(
                    engine.targets, _kind("slow", [rank]), 30, f"rank {rank} slow",
                    interval=1.0)
            finally:
                stop.set()
                thread.join(2)
                worker.send_signal(signal.SIGCONT)
            finished = await traffic.stop()
        except BaseException:
            stop.set()
            worker.send_signal(signal.SIGCONT)
            traffic.cancel()
            raise
        await _healthy_again(engine)
        return report, seconds, finished

    report, seconds, finished = engine.run(scenario(), 180, "throttled worker")
    print(f"throttled worker of rank {rank} named after {seconds:.1f} s:\n{report.render()}")
    assert "straggler" in report.verdict.summary
    assert report.verdict.victims == [1 - rank]
    assert cpu_verdicts["slow"] == ("slow", [rank])  # the CPU cluster's slow worker
    assert report.exit_code == 1
    assert finished and set(finished) == {"length"}, finished


def test_a_slow_collective_rpc_on_one_rank_names_that_rank_never_its_peer(engine, rng):
    from tests.vllm_helpers import bounded, doctor_until

    rank = rng.choice((0, 1))
    # runs in every worker (pickled by value: a lambda); only the chosen rank's is slow
    slow_load = (lambda worker, r, seconds: __import__("time").sleep(seconds)  # noqa: E731
                 if worker.vllm_config.parallel_config.data_parallel_rank == r else None)

    async def scenario():
        await bounded(engine.llm.pause_generation(mode="keep"), 60, "pause(keep)")
        rpc = asyncio.ensure_future(engine.llm.collective_rpc(slow_load, args=(rank, 12.0)))
        try:
            report, seconds = await doctor_until(engine.targets, _kind("stuck", [rank]), 11,
                                                 f"rank {rank} named inside collective_rpc")
            await bounded(rpc, 60, "slow collective_rpc")
        except BaseException:
            rpc.cancel()
            raise
        await bounded(engine.llm.resume_generation(), 60, "resume")
        await _healthy_again(engine)
        return report, seconds

    report, seconds = engine.run(scenario(), 120, "slow collective_rpc")
    print(f"rank {rank} inside collective_rpc named after {seconds:.1f} s:\n{report.render()}")
    assert 1 - rank not in report.verdict.culprits
    assert "collective_rpc" in report.verdict.summary
    assert report.exit_code == 2


def test_a_wedge_inside_the_model_collective_on_every_rank_is_wedged_never_healthy(
        engine, cpu_verdicts):
    from tests.vllm_helpers import Traffic, doctor_until

    async def scenario():
        traffic = Traffic(engine.llm)
        try:
            await doctor_until(engine.targets, lambda r: "requests in flight" in
                               r.verdict.summary, 30, "traffic on both ranks")
            engine.wedge_file.touch()
            try:
                report, seconds = await doctor_until(engine.targets, _kind("wedged", []), 20,
                                                     "wedged")
                # it stays wedged (never healthy) for as long as the wedge lasts
                again, _ = await doctor_until(engine.targets, lambda r: True, 5, "again")
            finally:
                engine.wedge_file.unlink()
            finished = await traffic.stop()
        except BaseException:
            traffic.cancel()
            raise
        await _healthy_again(engine)
        return report, seconds, again, finished

    report, seconds, again, finished = engine.run(scenario(), 180, "wedge on all ranks")
    print(f"all-rank wedge reported after {seconds:.1f} s:\n{report.render()}")
    assert "dp_coordinate" in report.verdict.summary  # names the collective
    assert again.verdict.kind == "wedged", again.render()
    assert cpu_verdicts["wedge"] == ("wedged", [])  # the CPU cluster's wedge
    assert report.exit_code == 2
    assert finished and set(finished) == {"length"}, finished
