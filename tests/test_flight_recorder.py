"""Flight recorder (issue 14), fast layer: the ring and sequence numbers behind the probe, the
watchdog's incident rule and bounded dumps, and the cross-rank analysis as a table.

Dumps here come from real ``TelemetryProbe`` objects driven through the probe interface the
engines call, snapshotted by the real ``Watchdog``: the analysis reads what the ranks write.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from instrumented_core.flight_analysis import analyze, load_dumps, rank_list, write_bundle
from instrumented_core.protocol import Phase, SyncResult
from instrumented_core.telemetry import TelemetryConfig
from instrumented_core.telemetry import names as n
from instrumented_core.telemetry.flight_recorder import FlightRecorderCollector
from instrumented_core.telemetry.probe import TelemetryProbe
from instrumented_core.telemetry.watchdog import (
    FLOOR_SECONDS,
    MAX_DUMP_BYTES,
    MAX_DUMPS_PER_RANK,
    Watchdog,
)


class State:
    """What the probe reads from an engine (vLLM's attribute names)."""

    def __init__(self, running: bool = True) -> None:
        self.engines_running = running
        self.ignore_start_dp_wave = False
        self.pending_pause = False
        self.current_wave = 0
        self.step_counter = 0
        self.sync_interval = 16


def probe_for(rank: int, dp: int = 2, running: bool = True,
              protocol: str = "two-phase") -> TelemetryProbe:
    probe = TelemetryProbe(rank, dp, protocol=protocol)
    probe.attach(State(running))
    return probe


# Scripted engine behaviour, through the probe interface.
def sync(p: TelemetryProbe, votes: int = 0) -> None:
    p.sync_begin(True, False)
    p.sync_end(SyncResult(True, votes, p.dp_size), 0.0005)


def coll(name: str):
    def run(p: TelemetryProbe) -> None:
        p.collective_begin(name)
        p.collective_end(name, 0.001)
    return run


def enter(name: str):
    def run(p: TelemetryProbe) -> None:
        if name == n.COLLECTIVE_SYNC:
            p.sync_begin(True, False)
        else:
            p.collective_begin(name)
    return run


def steps(k: int):
    def run(p: TelemetryProbe) -> None:
        for _ in range(k):
            p.collective_begin(n.COLLECTIVE_STEP)
            p.collective_end(n.COLLECTIVE_STEP, 0.001)
            p.step_end(True)
    return run


def pausing(p: TelemetryProbe) -> None:
    p.pause_requested("keep")
    p.phase_changed(Phase.RUNNING, Phase.PENDING_PAUSE)


def paused(p: TelemetryProbe) -> None:
    p.pause_requested("keep")
    p.phase_changed(Phase.RUNNING, Phase.PAUSED)


def woken(p: TelemetryProbe) -> None:
    p.start_dp_wave(3, None, "acted")
    p.phase_changed(Phase.PAUSED, Phase.PENDING_PAUSE)


def stale(p: TelemetryProbe) -> None:
    p.hot.last_progress = time.time() - 60


def dump_of(rank: int, dp: int, script, tmp_path: Path | None = None,
            protocol: str = "two-phase") -> dict:
    probe = probe_for(rank, dp, protocol=protocol)
    for op in script:
        op(probe)
    wd = Watchdog(probe, tmp_path or "/nonexistent", threshold=1.0)
    data = wd.snapshot(wd.check(time.time() + 100))
    data["_source"] = f"flight-rank{rank:04d}.json"
    return data


HISTORY = [sync, sync, paused, coll(n.COLLECTIVE_BARRIER)]  # DP collectives #1-#3

CASES = {
    # name: (per-rank scripts, divergence_seq, culprits, victims, divergence words, cause?,
    #        protocol)
    "#36594 on the CPU cluster: rank 0 in the barrier, the woken rank inside a step": (
        [HISTORY + [enter(n.COLLECTIVE_BARRIER)],
         HISTORY + [woken, steps(3), enter(n.COLLECTIVE_STEP)]],
        4, [1], [0], ["DP collective #4", "rank 0 in barrier", "rank 1 never entered it",
                      "inside step"], True),
    "#36594 as vLLM shows it: rank 0 in barrier, ranks 1-3 in sync_dp_state": (
        [HISTORY + [enter(n.COLLECTIVE_BARRIER)]]
        + [HISTORY + [woken, steps(1), enter(n.COLLECTIVE_SYNC)]] * 3,
        4, [1, 2, 3], [0], ["DP collective #4: rank 0 in barrier; ranks 1-3 in sync_dp_state"],
        True),
    "a stalled rank: never entered the sync its peers wait in": (
        [[sync, steps(16), enter(n.COLLECTIVE_SYNC)], [sync, steps(16), stale],
         [sync, steps(16), enter(n.COLLECTIVE_SYNC)]],
        2, [1], [0, 2], ["DP collective #2: ranks 0, 2 in sync_dp_state",
                         "rank 1 never entered it (in no collective"], False),
    "all ranks in the same sync round: no divergence": (
        [[sync, steps(4), enter(n.COLLECTIVE_SYNC)]] * 2, None, [], [], [], False),
    "a mismatch without a wake-up: the smaller side is named": (
        [HISTORY + [enter(n.COLLECTIVE_BARRIER)], HISTORY + [enter(n.COLLECTIVE_BARRIER)],
         HISTORY + [enter(n.COLLECTIVE_RPC)]],
        4, [2], [0, 1], ["ranks 0, 1 in barrier", "rank 2 in collective_rpc"], False),
    "a wave acted on while pending (two-phase, normal) is not named as the cause": (
        [[sync, enter(n.COLLECTIVE_SYNC)],
         [lambda p: p.phase_changed(Phase.RUNNING, Phase.PENDING_PAUSE),
          lambda p: p.start_dp_wave(2, None, "acted"), sync, stale]],
        2, [1], [0], ["rank 1 never entered it"], False),
    "legacy pause on vLLM: the wave that woke a rank still flagged pending is the cause": (
        [[sync, pausing, sync, enter(n.COLLECTIVE_BARRIER)],
         [sync, pausing, sync, lambda p: p.start_dp_wave(3, None, "acted"),
          enter(n.COLLECTIVE_STEP)]],
        3, [1], [0], ["DP collective #3: rank 0 in barrier; rank 1 never entered it"], True,
        "legacy"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_analysis_names_first_divergence_culprits_and_cause(name):
    scripts, seq, culprits, victims, words, cause, *protocol = CASES[name]
    dp = len(scripts)
    result = analyze([dump_of(r, dp, s, protocol=(protocol or ["two-phase"])[0])
                      for r, s in enumerate(scripts)])
    text = result.render()
    assert result.divergence_seq == seq, text
    assert result.culprits == culprits, text
    assert result.victims == victims, text
    for w in words:
        assert w in result.divergence, text
    assert ("START_DP_WAVE (wave 3) acted on during a pause" in result.cause) == cause, text
    assert result.missing == []


def test_ring_that_lost_early_history_compares_only_what_both_kept():
    many = [sync] * 700  # more events than the ring keeps: rank 0 lost #1..#~450
    d0 = dump_of(0, 2, many + [enter(n.COLLECTIVE_SYNC)])
    d1 = dump_of(1, 2, many[:100] + many[100:] + [enter(n.COLLECTIVE_SYNC)])
    assert min(e["dp_seq"] for e in d0["events"]) > 300
    result = analyze([d0, d1])
    assert result.divergence_seq is None, result.render()


def test_newest_dump_per_rank_wins_and_a_rank_without_dump_is_listed():
    old = dump_of(0, 3, [sync, enter(n.COLLECTIVE_RPC)])
    old["written_at"] -= 100
    new = dump_of(0, 3, [sync, enter(n.COLLECTIVE_SYNC)])
    other = dump_of(1, 3, [sync, enter(n.COLLECTIVE_SYNC)])
    result = analyze([new, old, other])
    assert "ranks 0, 1 in sync_dp_state" in result.divergence  # not rank 0's older rpc dump
    assert result.missing == [2]
    assert "no dump from rank 2" in result.render()


def test_a_rank_without_dump_is_named_when_its_peers_wait_for_it():
    # rank 2 was killed before its watchdog fired: ranks 0 and 1 wait in sync round #2
    result = analyze([dump_of(r, 3, [sync, steps(16), enter(n.COLLECTIVE_SYNC)])
                      for r in (0, 1)])
    assert result.divergence_seq == 2 and result.culprits == [2] and result.victims == [0, 1]
    assert "DP collective #2: ranks 0, 1 in sync_dp_state; rank 2 left no dump" in \
        result.divergence
    # one dump, from a rank that waits in no collective: it is the one stuck
    alone = analyze([dump_of(0, 2, [sync, stale])])
    assert alone.culprits == [0] and alone.divergence_seq is None


def test_rank_list():
    assert rank_list([1]) == "rank 1"
    assert rank_list([3, 1, 2]) == "ranks 1-3"
    assert rank_list([0, 2]) == "ranks 0, 2"


# -- the recorder behind the probe --------------------------------------------------------------

def test_probe_numbers_dp_collectives_counts_steps_and_exposes_two_series():
    probe = probe_for(0)
    for op in [sync, steps(5), coll(n.COLLECTIVE_BARRIER), coll(n.COLLECTIVE_RPC),
               coll(n.COLLECTIVE_RESUME), sync]:
        op(probe)
    probe.utility_call("is_paused")
    rec = probe.flight
    assert (rec.dp_seq, rec.step_seq) == (5, 5)
    entered = [(e["dp_seq"], e["collective"]) for e in rec.snapshot() if e["kind"] == "enter"]
    assert entered == [(1, "sync_dp_state"), (2, "barrier"), (3, "collective_rpc"),
                       (4, "resume"), (5, "sync_dp_state")]
    syncs = [e for e in rec.snapshot() if e["kind"] == "sync"]
    assert syncs[0]["local_unfinished"] is True and syncs[0]["pause_votes"] == 0
    assert rec.snapshot()[-1]["method"] == "is_paused"
    registry = CollectorRegistry()
    labels = {n.LABEL_ENGINE: "0", n.LABEL_MODEL_NAME: "m"}
    registry.register(FlightRecorderCollector(rec, labels))
    assert registry.get_sample_value(n.DP_COLLECTIVE_SEQ, labels) == 5
    assert registry.get_sample_value(n.FLIGHT_DUMPS_TOTAL, labels) == 0


def test_snapshot_while_the_engine_thread_appends_never_fails():
    probe = probe_for(0)
    stop = threading.Event()

    def engine():
        while not stop.is_set():
            probe.collective_begin(n.COLLECTIVE_BARRIER)
            probe.collective_end(n.COLLECTIVE_BARRIER, 0.0)

    t = threading.Thread(target=engine)
    t.start()
    try:
        for _ in range(200):
            events = probe.flight.snapshot()
            assert len(events) <= probe.flight.capacity
    finally:
        stop.set()
        t.join()


# -- the watchdog -------------------------------------------------------------------------------

def test_one_dump_per_incident_with_the_engine_threads_stack(tmp_path):
    probe = probe_for(1)
    inside = threading.Event()
    release = threading.Event()

    def blocked_in_the_dp_barrier():
        probe.collective_begin(n.COLLECTIVE_BARRIER)
        inside.set()
        release.wait(10)
        probe.collective_end(n.COLLECTIVE_BARRIER, 0.0)

    t = threading.Thread(target=blocked_in_the_dp_barrier)
    t.start()
    try:
        assert inside.wait(5)
        wd = Watchdog(probe, tmp_path, threshold=0.5, engine_thread=t.ident)
        assert wd.poll(time.time()) is None  # not yet past the threshold
        later = time.time() + 1.0
        path = wd.poll(later)
        assert path is not None and wd.poll(later + 5) is None  # ONE dump per incident
        data = json.loads(path.read_text())
        assert data["reason"]["kind"] == "inside" and data["reason"]["collective"] == "barrier"
        assert any("blocked_in_the_dp_barrier" in line for line in data["stack"])
        assert data["dp_seq"] == 1 and probe.flight.dumps == 1
    finally:
        release.set()
        t.join()
    probe.progress()
    assert wd.poll(time.time()) is None  # out of the collective: the incident is over
    probe.collective_begin(n.COLLECTIVE_BARRIER)
    assert wd.poll(time.time() + 1.0) is not None  # a new entry is a new incident


def test_no_dump_when_idle_paused_or_progressing(tmp_path):
    wd_idle = Watchdog(probe_for(0, running=False), tmp_path, threshold=0.5)
    wd_idle.probe.hot.last_progress -= 3600
    assert wd_idle.poll(time.time()) is None  # idle: no steps expected
    p = probe_for(0)
    paused(p)
    p.hot.last_progress -= 3600
    assert Watchdog(p, tmp_path, threshold=0.5).poll(time.time()) is None  # paused
    p = probe_for(0)
    p.hot.last_progress -= 3600
    assert Watchdog(p, tmp_path, threshold=0.5).check().kind == "no_progress"  # busy, stuck
    steps(1)(p)
    assert Watchdog(p, tmp_path, threshold=0.5).poll(time.time()) is None
    assert list(tmp_path.iterdir()) == []


def test_default_threshold_follows_the_p99_sync_wait_with_a_floor(tmp_path):
    probe = probe_for(0)
    wd = Watchdog(probe, tmp_path)
    assert wd.threshold() == (FLOOR_SECONDS, "floor")
    for _ in range(100):
        probe.sync_begin(False, False)
        probe.sync_end(SyncResult(False, 0, 2), 1.0)
    limit, source = wd.threshold()
    assert limit == 50.0 and "p99" in source


def test_dumps_are_bounded_in_size_and_count(tmp_path):
    probe = probe_for(0)
    for _ in range(2000):
        probe.utility_call("x" * 64)
    wd = Watchdog(probe, tmp_path, threshold=0.5)
    for k in range(MAX_DUMPS_PER_RANK + 4):
        probe.collective_begin(n.COLLECTIVE_RPC)  # a new incident each time
        assert wd.poll(time.time() + 10 + k) is not None
    files = sorted(tmp_path.glob("flight-rank0000-*.json"))
    assert len(files) == MAX_DUMPS_PER_RANK
    assert max(f.stat().st_size for f in files) <= MAX_DUMP_BYTES
    assert probe.flight.dumps == MAX_DUMPS_PER_RANK + 4


def test_analyze_command_and_bundle_round_trip(tmp_path):
    dumps = tmp_path / "flight"
    dumps.mkdir()
    scripts = CASES["#36594 on the CPU cluster: rank 0 in the barrier, the woken rank inside "
                    "a step"][0]
    for r, script in enumerate(scripts):
        d = dump_of(r, 2, script)
        d.pop("_source")
        (dumps / f"flight-rank{r:04d}-1-1.json").write_text(json.dumps(d))
    bundle = tmp_path / "out.tar.gz"
    run = subprocess.run([sys.executable, "-m", "instrumented_core.cli", "analyze", str(dumps),
                          "--bundle", str(bundle)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr  # diverged
    assert "first divergence: DP collective #4: rank 0 in barrier" in run.stdout
    again = analyze(load_dumps(bundle))
    assert again.divergence_seq == 4 and again.culprits == [1]
    write_bundle(load_dumps(bundle), again, tmp_path / "again.tar.gz")
    bad = subprocess.run([sys.executable, "-m", "instrumented_core.cli", "analyze",
                          str(tmp_path / "nope")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "does not exist" in bad.stderr


@pytest.mark.parametrize("raw, problem", [("soon", "is not a number of seconds"),
                                          ("-3", "must be > 0")])
def test_a_bad_watchdog_threshold_is_one_line_naming_the_fix(raw, problem):
    from instrumented_core.telemetry.config import ENV_WATCHDOG, TelemetryConfigError

    with pytest.raises(TelemetryConfigError) as info:
        TelemetryConfig.from_env({ENV_WATCHDOG: raw})
    assert problem in str(info.value) and "\n" not in str(info.value)


def test_watchdog_settings_and_the_default_dump_directory(tmp_path):
    from instrumented_core.telemetry.config import ENV_FLIGHT_DIR, ENV_WATCHDOG

    cfg = TelemetryConfig.from_env({}, spans_file=str(tmp_path / "run" / "spans.jsonl"))
    assert cfg.watchdog and cfg.watchdog_seconds is None
    assert cfg.flight_dump_dir == tmp_path / "run" / "flight"
    cfg = TelemetryConfig.from_env({ENV_WATCHDOG: "off", ENV_FLIGHT_DIR: str(tmp_path / "d")})
    assert not cfg.watchdog and cfg.flight_dump_dir == tmp_path / "d"
    assert TelemetryConfig.from_env({ENV_WATCHDOG: "7.5"}).watchdog_seconds == 7.5


def test_report_shows_the_analysis_when_the_run_left_dumps(tmp_path):
    from instrumented_core.report import build_report

    quiet = tmp_path / "quiet"
    assert "No hang dumps" in build_report(quiet).read_text()
    hung = tmp_path / "hung"
    (hung / "flight").mkdir(parents=True)
    scripts = CASES["#36594 on the CPU cluster: rank 0 in the barrier, the woken rank inside "
                    "a step"][0]
    for r, script in enumerate(scripts):
        d = dump_of(r, 2, script)
        d.pop("_source")
        (hung / "flight" / f"flight-rank{r:04d}-1-1.json").write_text(json.dumps(d))
    page = build_report(hung).read_text()
    assert 'id="flight-verdict"' in page
    assert "DP collective #4: rank 0 in barrier; rank 1 never entered it" in page
    assert "START_DP_WAVE (wave 3)" in page
