"""``diagnose()`` on its own: every verdict and the edges between them (pure, no processes).

Each case is what the doctor would read from two DP ranks' (or three's) endpoints, written as
``RankView``s, and the verdict an on-call engineer must get: kind, culprits, victims, and the
words that name what is going on.
"""

from __future__ import annotations

import pytest

from instrumented_core.diagnosis import VERDICTS, RankView, diagnose

T = 2.0  # threshold


def R(rank, **kw) -> RankView:
    return RankView(rank=rank, **kw)


def worker(rank, *, call="execute_model", call_s=0.0, coll=None, coll_s=0.0, seq=100,
           heartbeat=0.1, **kw) -> RankView:
    """A rank with one worker on the board (as real vLLM shows it)."""
    kw.setdefault("engines_running", True)
    kw.setdefault("requests", 2)
    return RankView(rank=rank, workers=1, worker_call=call, worker_call_seconds=call_s,
                    model_collective=coll, model_collective_seconds=coll_s,
                    model_collective_seq=seq, worker_heartbeat_age=heartbeat, **kw)


CASES = {
    # --- healthy, idle, pausing, paused ------------------------------------------------
    "idle group: healthy and idle, even after minutes without progress": (
        [R(0, requests=0, progress_age=600), R(1, requests=0, progress_age=600)],
        "healthy", [], [], ["idle"]),
    "busy group progressing: healthy with its work in flight": (
        [R(0, requests=3, engines_running=True, collective="step", inside_seconds=0.01),
         R(1, requests=1, engines_running=True)],
        "healthy", [], [], ["4 requests in flight"]),
    "engine that cannot count its requests: healthy, not called idle": (
        [R(0), R(1)], "healthy", [], [], []),
    "one rank pending: pausing, with the next sync round": (
        [R(0, phase="pending_pause", steps_until_sync=5, engines_running=True),
         R(1, engines_running=True)], "pausing", [], [], ["1 of 2", "in 5 steps"]),
    "all paused holding kept requests without progress: paused, never wedged": (
        [R(0, phase="paused", requests=2, progress_age=300),
         R(1, phase="paused", requests=1, progress_age=300)], "paused", [], [], ["consensus"]),
    "a step just under the threshold is not waiting": (
        [worker(0, coll="all_gatherv", coll_s=T - 0.1, progress_age=T - 0.1),
         worker(1, progress_age=T - 0.1)], "healthy", [], [], []),
    # --- unreachable ---------------------------------------------------------------------
    "an unreachable rank is the culprit, its peers victims": (
        [R(0, collective="sync_dp_state", inside_seconds=9), R(1, reachable=False)],
        "stuck", [1], [0], ["unreachable"]),
    "a partitioned host: its ranks named with the host, its peers waiting in sync": (
        [R(0, collective="sync_dp_state", inside_seconds=9, engines_running=True,
           source="10.9.9.11:8100"),
         R(1, reachable=False, no_answer="unreachable", source="10.9.9.12:8101"),
         R(2, reachable=False, no_answer="unreachable", source="10.9.9.12:8102")],
        "stuck", [1, 2], [0], ["ranks 1, 2 unreachable: no connection from the monitor "
                               "(host 10.9.9.12)", "stopped stepping",
                               "rank 0 waits for them in sync_dp_state"]),
    "unreachable from the monitor while its peers keep stepping: unobserved, not stuck": (
        [R(0, engines_running=True, requests=2, progress_age=0.1, source="10.9.9.11:8100"),
         R(1, reachable=False, no_answer="unreachable", source="10.9.9.12:8101")],
        "unobserved", [1], [], ["host 10.9.9.12", "keep stepping", "path to that host"]),
    "unreachable while the peers are idle: cannot tell it still steps, so stuck": (
        [R(0, requests=0, progress_age=30), R(1, reachable=False, no_answer="unreachable")],
        "stuck", [1], [0], ["no connection from the monitor"]),
    "a frozen process (SIGSTOP) is unresponsive, neither healthy nor dead": (
        [R(0, collective="sync_dp_state", inside_seconds=5, engines_running=True),
         R(1, reachable=False, no_answer="unresponsive", source="10.9.9.12:8101")],
        "stuck", [1], [0], ["rank 1 unreachable: unresponsive", "frozen", "not dead"]),
    "a frozen process is stuck even while its peers still step (no unobserved)": (
        [R(0, engines_running=True, requests=1, progress_age=0.1),
         R(1, reachable=False, no_answer="unresponsive")],
        "stuck", [1], [0], ["unresponsive"]),
    "a killed process refuses connections: down": (
        [R(0, collective="sync_dp_state", inside_seconds=5),
         R(1, reachable=False, no_answer="refused", source="10.9.9.12:8101")],
        "stuck", [1], [0], ["rank 1 unreachable: down (connection refused)", "gone"]),
    # --- cross-rank collectives ----------------------------------------------------------
    "a rank that never entered the sync all-reduce its peers wait in": (
        [R(0, collective="sync_dp_state", inside_seconds=5, phase="pending_pause"),
         R(1, progress_age=5, phase="pending_pause"),
         R(2, collective="sync_dp_state", inside_seconds=4, phase="pending_pause")],
        "stuck", [1], [0, 2], ["never entered sync_dp_state"]),
    "all ranks inside the barrier: stuck, no culprit": (
        [R(0, collective="barrier", inside_seconds=5),
         R(1, collective="barrier", inside_seconds=5)], "stuck", [], [0, 1], ["barrier"]),
    "#36594: barrier vs a paused rank stepping: deadlock naming the stepping rank": (
        [R(0, phase="paused", collective="barrier", inside_seconds=6),
         R(1, phase="paused", collective="step", inside_seconds=5)],
        "deadlock", [1], [0], ["mismatched", "barrier", "step"]),
    "#36594 with the workers' view: the stepping rank's worker waits in a collective": (
        [worker(0, phase="paused", call=None, collective="barrier", inside_seconds=6),
         worker(1, phase="paused", collective="step", inside_seconds=5, coll="dp_coordinate",
                coll_s=5)], "deadlock", [1], [0], ["mismatched"]),
    "a rank wedged in its forward (no model collective) while its peer waits to sync": (
        [worker(0, call=None, collective="sync_dp_state", inside_seconds=6),
         worker(1, collective="step", inside_seconds=6, call_s=6)],
        "stuck", [1], [0], ["still inside step", "waiting for it in sync_dp_state"]),
    # --- the workers' view inside a step ---------------------------------------------------
    "a frozen worker (stale heartbeat) with work in flight is named": (
        [worker(0, collective="step", inside_seconds=5, coll="all_gatherv", coll_s=5),
         worker(1, collective="step", inside_seconds=5, heartbeat=5.0)],
        "stuck", [1], [0], ["frozen", "heartbeat"]),
    "a frozen worker in an idle group is not a wedge": (
        [worker(0, requests=0, engines_running=False, call=None),
         worker(1, requests=0, engines_running=False, call=None, heartbeat=30.0)],
        "healthy", [], [], ["idle"]),
    "a worker outside the model collective its peers wait in is the culprit": (
        [worker(0, collective="step", inside_seconds=6, coll="all_gatherv", coll_s=6,
                progress_age=6),
         worker(1, collective="step", inside_seconds=6, call_s=6, progress_age=6)],
        "stuck", [1], [0], ["not in the model collective", "inside execute_model"]),
    "a worker stopped between calls while its engine waits in step": (
        [worker(0, collective="step", inside_seconds=6, coll="dp_coordinate", coll_s=6),
         worker(1, collective="step", inside_seconds=6, call=None)],
        "stuck", [1], [0], ["outside any call", "engine inside step"]),
    "a worker behind by sequence number (stopped inside an earlier collective)": (
        [worker(0, collective="step", inside_seconds=6, coll="dp_coordinate", coll_s=6,
                seq=291),
         worker(1, collective="step", inside_seconds=6, coll="reduce_scatterv", coll_s=6,
                seq=290)], "stuck", [1], [0], ["behind", "#290", "#291"]),
    "every worker inside the same model collective, no progress: wedged, the network": (
        [worker(0, collective="step", inside_seconds=6, coll="dp_coordinate", coll_s=6,
                seq=77, progress_age=6),
         worker(1, collective="step", inside_seconds=6, coll="dp_coordinate", coll_s=6,
                seq=77, progress_age=6)],
        "wedged", [], [], ["dp_coordinate #77", "collective network"]),
    "every rank inside step, no model collective visible, no progress: wedged": (
        [R(0, collective="step", inside_seconds=7, progress_age=7, requests=1,
           engines_running=True),
         R(1, collective="step", inside_seconds=7, progress_age=7, requests=1,
           engines_running=True)], "wedged", [], [], ["no model collective visible"]),
    "work in flight, no progress anywhere, nothing inside: wedged, never healthy": (
        [R(0, requests=3, engines_running=True, progress_age=9),
         R(1, requests=0, engines_running=True, progress_age=9)],
        "wedged", [], [], ["no collective visible", "3 requests"]),
    # --- engine-to-worker calls ------------------------------------------------------------
    "a rank still inside collective_rpc while its peer returned is the culprit": (
        [worker(0, phase="paused", call=None, progress_age=9, requests=0,
                engines_running=False),
         worker(1, phase="paused", call="rpc", call_s=9, collective="collective_rpc",
                inside_seconds=9, requests=0, engines_running=False)],
        "stuck", [1], [], ["still inside collective_rpc", "rank 0 returned"]),
    "every rank inside a long collective_rpc: stuck without a culprit": (
        [R(0, phase="paused", collective="collective_rpc", inside_seconds=20),
         R(1, phase="paused", collective="collective_rpc", inside_seconds=20)],
        "stuck", [], [0, 1], ["collective_rpc", "weight load"]),
    "one rank inside step while its peers returned (no workers' view)": (
        [R(0, collective="step", inside_seconds=4, engines_running=True),
         R(1, engines_running=True)], "stuck", [0], [], ["still inside step"]),
    # --- stragglers --------------------------------------------------------------------------
    "workers that hardly wait while their peers' wait: a straggler with a score": (
        [worker(0, model_wait_fraction=0.85), worker(1, model_wait_fraction=0.2,
                                                     progress_age=0.3,
                                                     model_collectives_advanced=40)],
        "slow", [1], [0], ["straggler", "score 0.24"]),
    "a worker stopped a moment ago (its peers already wait) is not called slow": (
        [worker(0, model_wait_fraction=1.0, coll="all_reduce", coll_s=1.2, progress_age=1.2),
         worker(1, model_wait_fraction=0.0, call_s=1.2, progress_age=1.2)],
        "healthy", [], [], []),
    "a worker that entered no collective in the window has stopped, it is not slow": (
        [worker(0, model_wait_fraction=1.0, coll="all_reduce", coll_s=0.5, progress_age=0.5),
         worker(1, model_wait_fraction=0.0, call_s=0.5, progress_age=0.5,
                model_collectives_advanced=0)],
        "healthy", [], [], []),
    "all workers wait a little: no straggler": (
        [worker(0, model_wait_fraction=0.25), worker(1, model_wait_fraction=0.05)],
        "healthy", [], [], []),
    "a straggler that stopped progressing is not called slow": (
        [worker(0, model_wait_fraction=0.9), worker(1, model_wait_fraction=0.1,
                                                    progress_age=T + 1)],
        "healthy", [], [], []),
    "engine-level straggler (the CPU cluster without workers)": (
        [R(0, engines_running=True, wait_fraction=0.9),
         R(1, engines_running=True, wait_fraction=0.1),
         R(2, engines_running=True, wait_fraction=0.8)], "slow", [1], [0, 2], ["straggler"]),
    # --- a pause that does not converge ------------------------------------------------------
    "a pause fanned out to some engines only: not converging, naming the rank never asked": (
        [R(0, phase="pending_pause", pending_seconds=8.0, steps_until_sync=16,
           engines_running=True, requests=2),
         R(1, engines_running=True, requests=2)],
        "not_converging", [1], [0], ["not converging", "rank 1 never voted", "rank 0 pending "
                                     "for 8.0 s", "next sync round in 16 steps"]),
    "pending through more sync rounds than consensus takes: not converging": (
        [R(0, phase="pending_pause", pending_seconds=0.9, pending_sync_rounds=5,
           engines_running=True),
         R(1, phase="pending_pause", pending_seconds=0.9, pending_sync_rounds=5,
           engines_running=True)],
        "not_converging", [], [0, 1], ["5 sync rounds without consensus", "not reaching"]),
    "a peer not asked yet, just under the threshold: still pausing": (
        [R(0, phase="pending_pause", pending_seconds=T - 0.1, pending_sync_rounds=1,
           engines_running=True),
         R(1, engines_running=True)], "pausing", [], [], ["1 of 2"]),
    "a legacy pause pends while its rank drains: pausing, not 'not converging'": (
        [R(0, phase="pending_pause", pending_seconds=30, protocol="legacy",
           engines_running=True),
         R(1, engines_running=True, protocol="legacy")], "pausing", [], [], []),
    "a pending rank waiting in sync_dp_state for a stopped peer: stuck, not a missing vote": (
        [R(0, phase="pending_pause", pending_seconds=5, collective="sync_dp_state",
           inside_seconds=4, engines_running=True),
         R(1, progress_age=5, engines_running=True)],
        "stuck", [1], [0], ["never entered sync_dp_state"]),
    # --- doubt about what was read: a verdict of its own, never healthy ---------------------
    "a target answering with something else is not a vLLM DP endpoint, never a healthy rank": (
        [R(0, dp_size=2, source="h:8100"),
         R(1, source="h:8101", not_endpoint="no vllm_dp_ series in its answer")],
        "not_dp_endpoint", [], [], ["not a vLLM DP endpoint", "h:8101",
                                    "no vllm_dp_ series", "among the 1 ranks read: HEALTHY"]),
    "a rank whose plugin is off (status-only endpoint) is named with the reason": (
        [R(0, dp_size=2, source="h:8100"),
         R(1, source="h:8101", not_endpoint="the plugin is off there (contract_mismatch)",
           plugin_off="contract_mismatch (vLLM 0.20.2)")],
        "not_dp_endpoint", [], [], ["plugin off on rank 1 (h:8101): contract_mismatch "
                                    "(vLLM 0.20.2)", "among the 1 ranks read: HEALTHY"]),
    "fewer targets than the ranks' own DP size: incomplete, naming the missing engine": (
        [R(0, dp_size=4), R(1, dp_size=4), R(2, dp_size=4)],
        "incomplete", [], [], ["incomplete: 3 of 4 ranks", "engine 3 not among the targets"]),
    "incomplete with a dead target still diagnoses the ranks it read": (
        [R(0, dp_size=4, collective="sync_dp_state", inside_seconds=9), R(2, reachable=False),
         R(3, dp_size=4, collective="sync_dp_state", inside_seconds=9)],
        "incomplete", [], [], ["3 of 4 ranks", "engines 1, 2 did not answer or are not among",
                               "among the 3 ranks read: STUCK"]),
    "no ranks at all: incomplete, never 'healthy: 0 ranks'": (
        [], "incomplete", [], [], ["no ranks"]),
    "ranks of two deployments are never merged by engine number": (
        [R(0, dp_size=2, deployment="a"), R(1, dp_size=2, deployment="a"),
         R(0, dp_size=2, deployment="b"), R(1, dp_size=2, deployment="b")],
        "mixed", [], [], ["2 deployments", "'a': ranks 0, 1", "one deployment at a time"]),
    "ranks that disagree on the DP size are mixed": (
        [R(0, dp_size=2), R(1, dp_size=4)], "mixed", [], [], ["disagree on the DP size"]),
    "one engine on two targets is mixed": (
        [R(0, dp_size=2, source="a:1"), R(0, dp_size=2, source="b:1")],
        "mixed", [], [], ["engine 0 on a:1, b:1"]),
    "an engine number beyond the DP size is mixed": (
        [R(0, dp_size=2), R(5, dp_size=2)], "mixed", [], [], ["engine 5 outside the DP size 2"]),
    "more targets than the DP size is mixed": (
        [R(0, dp_size=2), R(1, dp_size=2), R(2, reachable=False)],
        "mixed", [], [], ["3 targets for a DP size of 2"]),
}


@pytest.mark.parametrize("views, kind, culprits, victims, words", CASES.values(), ids=CASES)
def test_verdict(views, kind, culprits, victims, words):
    verdict = diagnose(views, T)
    text = verdict.summary + "\n" + "\n".join(verdict.details)
    assert (verdict.kind, verdict.culprits, verdict.victims) == (kind, culprits, victims), text
    for word in words:
        assert word in text, (word, text)


def test_every_verdict_kind_is_covered_by_a_case():
    kinds = {kind for _, kind, _, _, _ in CASES.values()}
    assert kinds == set(VERDICTS)


def test_healthy_kinds_are_exactly_the_ones_the_doctor_exits_zero_for():
    for kind in VERDICTS:
        healthy = diagnose([R(0)], T).__class__(kind).healthy
        assert healthy == (kind in ("healthy", "pausing", "paused")), kind


def test_doubt_is_never_healthy_and_is_its_own_kind():
    for _, kind, _, _, _ in CASES.values():
        verdict = diagnose([R(0)], T).__class__(kind)
        assert not (verdict.doubtful and verdict.healthy), kind


def test_order_of_the_views_does_not_matter():
    views = CASES["a rank that never entered the sync all-reduce its peers wait in"][0]
    assert diagnose(list(reversed(views)), T).as_dict() == diagnose(views, T).as_dict()


@pytest.mark.parametrize("kind, culprits, expected, culprits_expected, matches", [
    ("healthy", [], "healthy", [], True),
    ("pausing", [], "healthy", [], True),  # a pause in flight is still healthy
    ("slow", [1], "healthy", [], False),
    ("stuck", [1], "stuck", [1], True),
    ("stuck", [0], "stuck", [1], False),  # the wrong rank named is a miss
    ("deadlock", [0], "deadlock", [1], True),  # which rank the late wave woke varies
    ("wedged", [], "wedged", [], True),
    ("stuck", [], "wedged", [], False),
])
def test_whether_a_verdict_is_the_expected_one_is_decided_in_one_place(
        kind, culprits, expected, culprits_expected, matches):
    from instrumented_core.diagnosis import verdict_matches

    assert verdict_matches(kind, culprits, expected, culprits_expected) is matches
