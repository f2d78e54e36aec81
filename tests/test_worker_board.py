"""The worker board: what a worker publishes is what its engine core's endpoint shows, even when
the worker is frozen mid-write or gone (pure: files in a temp dir, a fresh registry)."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest
from prometheus_client import CollectorRegistry

from instrumented_core.telemetry import names as n
from instrumented_core.telemetry import worker_board as wb
from instrumented_core.telemetry.metrics import WorkerBoardCollector

LABELS = {n.LABEL_ENGINE: "1", n.LABEL_MODEL_NAME: "m"}


@pytest.fixture(autouse=True)
def board_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(wb.ENV_BOARD_DIR, str(tmp_path))
    return tmp_path


def test_a_worker_position_round_trips_with_counts_and_times():
    w = wb.BoardWriter(3)
    try:
        w.call_enter(wb.CALL_CODES["execute_model"])
        w.collective_enter(wb.COLLECTIVE_CODES["dispatch"])
        w.collective_enter(wb.COLLECTIVE_CODES["all_gatherv"])  # nested: counted once
        (pos,) = wb.read_board()
        assert (pos.pid, pos.worker, pos.call, pos.collective, pos.collectives) == (
            os.getpid(), 3, "execute_model", "dispatch", 1)
        assert pos.consistent and pos.collective_inside(time.time()) >= 0
        w.collective_exit()
        assert wb.read_board()[0].collective == "dispatch"  # still inside the outer one
        w.collective_exit()
        w.call_exit()
        (pos,) = wb.read_board()
        assert (pos.call, pos.collective, pos.calls, pos.collectives) == ("", "", 1, 1)
        assert pos.call_inside(time.time()) == 0.0 and pos.call_seconds >= pos.collective_seconds
    finally:
        w.close()
    assert wb.read_board() == []  # close removes the record


def test_a_worker_stopped_in_the_middle_of_a_write_is_still_read():
    w = wb.BoardWriter(0)
    try:
        w.call_enter(wb.CALL_CODES["sample_tokens"])
        w._begin()  # the seqlock is now odd forever, as for a worker stopped mid-write
        (pos,) = wb.read_board()
        assert not pos.consistent and pos.call == "sample_tokens"
    finally:
        w.close()


def test_the_heartbeat_moves_until_the_writer_closes():
    w = wb.BoardWriter(0)
    try:
        first = wb.read_board()[0].heartbeat
        w.start_heartbeat(0.01)
        deadline = time.monotonic() + 5
        while wb.read_board()[0].heartbeat == first:
            assert time.monotonic() < deadline, "heartbeat never moved"
            time.sleep(0.005)
    finally:
        w.close()


def _child_writes(path: str, ready) -> None:
    os.environ[wb.ENV_BOARD_DIR] = path
    w = wb.BoardWriter(5)
    w.call_enter(wb.CALL_CODES["execute_dummy_batch"])
    ready.set()
    time.sleep(60)


def test_an_engine_reads_only_its_own_workers_and_collects_dead_records(board_dir):
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    child = ctx.Process(target=_child_writes, args=(str(board_dir), ready))
    child.start()
    try:
        assert ready.wait(30)
        (pos,) = wb.read_board()  # our child: its parent pid is ours
        assert (pos.pid, pos.worker, pos.call) == (child.pid, 5, "execute_dummy_batch")
        assert wb.read_board(owner_pid=1) == []  # not init's worker
    finally:
        child.kill()
        child.join(10)
    # the child is gone (SIGKILL: it could not remove its record); we are still alive, so our
    # own read keeps reporting its last position until the engine removes its records
    assert wb.read_board()[0].pid == child.pid
    assert wb.remove_board_files() == 1
    assert wb.read_board() == []


def test_records_of_dead_workers_whose_engine_is_gone_are_garbage_collected(board_dir):
    w = wb.BoardWriter(0)
    w.close(unlink=False)
    raw = bytearray((board_dir / f"w-{os.getpid()}").read_bytes())
    wb._HEADER.pack_into(raw, 0, 0, 2**22 + 12345, 2**22 + 12346, 0)  # pids that do not exist
    (board_dir / "w-stale").write_bytes(bytes(raw))
    os.unlink(board_dir / f"w-{os.getpid()}")
    assert wb.read_board() == []
    assert not (board_dir / "w-stale").exists()


def test_the_engine_endpoint_exposes_each_worker_from_a_fresh_registry():
    registry = CollectorRegistry()
    registry.register(WorkerBoardCollector(LABELS))
    assert registry.get_sample_value(n.WORKER_HEARTBEAT_AGE, {**LABELS, "worker": "0"}) is None
    w = wb.BoardWriter(0)
    try:
        w.call_enter(wb.CALL_CODES["execute_model"])
        w.collective_enter(wb.COLLECTIVE_CODES["reduce_scatterv"])
        labels = {**LABELS, "worker": "0"}
        # per worker: what names it (frozen? where?); per rank: the model collective
        assert registry.get_sample_value(n.WORKER_HEARTBEAT_AGE, labels) < 60
        assert registry.get_sample_value(n.WORKER_POSITION_INFO, {
            **labels, "call": "execute_model", "collective": "reduce_scatterv"}) == 1
        assert registry.get_sample_value(n.WORKER_MODEL_COLLECTIVES_TOTAL, LABELS) == 1
        assert registry.get_sample_value(n.WORKER_MODEL_COLLECTIVE_INSIDE, LABELS) >= 0
        w.collective_exit()
        w.call_exit()
        assert registry.get_sample_value(n.WORKER_MODEL_COLLECTIVE_INSIDE, LABELS) == 0
        assert registry.get_sample_value(n.WORKER_MODEL_COLLECTIVE_SECONDS_TOTAL, LABELS) >= 0
        assert registry.get_sample_value(n.WORKER_POSITION_INFO, {
            **labels, "call": "none", "collective": "none"}) == 1
    finally:
        w.close()


def test_a_rank_with_n_workers_serves_two_per_worker_and_three_for_the_rank():
    """Per worker only what names the culprit worker (heartbeat age, position); the model
    collective is the rank's, as the doctor reads it: inside only while ALL its workers are
    (since the latest entered), the lowest sequence number, the most-waiting worker's seconds."""
    registry = CollectorRegistry()
    registry.register(WorkerBoardCollector(LABELS))
    now, directory = time.time(), wb.board_dir()
    try:
        # four workers of this rank (records as their writers leave them; their parent: this
        # process): three in all_gatherv, worker 2 in no collective
        records = []
        for w in range(4):
            raw = bytearray(wb.SIZE)
            code = 0 if w == 2 else wb.COLLECTIVE_CODES["all_gatherv"]
            wb._RECORD.pack_into(raw, 0, 0, os.getpid() + 100_000 + w, os.getpid(), w,
                                 wb.CALL_CODES["execute_model"], now - 5, 3, 1.0,
                                 code, now - 4 + w if code else 0.0, 10 + w, 2.0 + w, now)
            records.append(bytes(raw))
        for w, raw in enumerate(records):
            with open(os.path.join(directory, f"w-rec{w}"), "wb") as f:
                f.write(raw)
        samples = [s for m in registry.collect() for s in m.samples]
        per_worker = [s for s in samples if n.LABEL_WORKER in s.labels]
        assert sorted(s.name for s in per_worker) == sorted(
            [n.WORKER_HEARTBEAT_AGE] * 4 + [n.WORKER_POSITION_INFO] * 4)
        assert sorted(s.name for s in samples if s not in per_worker) == sorted(
            n.WORKER_RANK_SERIES)
        assert registry.get_sample_value(n.WORKER_MODEL_COLLECTIVE_INSIDE, LABELS) == 0
        assert registry.get_sample_value(n.WORKER_MODEL_COLLECTIVES_TOTAL, LABELS) == 10
        assert registry.get_sample_value(n.WORKER_MODEL_COLLECTIVE_SECONDS_TOTAL, LABELS) == 5.0
        # worker 2 enters too: the rank is inside, since the latest of them (worker 3) entered
        for w in range(4):
            raw = bytearray(records[w])
            wb._COLL_ENTER.pack_into(raw, wb._COLL_AT, wb.COLLECTIVE_CODES["all_gatherv"],
                                     now - 4 + w, 10 + w)
            with open(os.path.join(directory, f"w-rec{w}"), "wb") as f:
                f.write(bytes(raw))
        inside = registry.get_sample_value(n.WORKER_MODEL_COLLECTIVE_INSIDE, LABELS)
        assert 0 < inside < 2, inside  # worker 3 entered at now - 1
    finally:
        for w in range(4):  # records of this process's "workers": read_board keeps them
            if os.path.exists(os.path.join(directory, f"w-rec{w}")):
                os.unlink(os.path.join(directory, f"w-rec{w}"))


def test_every_exposed_worker_series_is_a_known_name():
    registry = CollectorRegistry()
    registry.register(WorkerBoardCollector(LABELS))
    w = wb.BoardWriter(0)
    try:
        names = {s.name for m in registry.collect() for s in m.samples}
    finally:
        w.close()
    assert names and names <= n.exposed_series_names(), names - n.exposed_series_names()
