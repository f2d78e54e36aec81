"""From per-rank observations to a verdict that names the culprit rank.

One pure function serves the cluster's hang report (fed from its shared-memory status
board), ``instrumented-core doctor`` (fed from live ``/metrics``) and the demos' summaries, so
all of them always agree on who is stuck.

Two kinds of waiting are kept apart. A **cross-rank collective** (``sync_dp_state``, the
resume all-reduce, the DP barrier) needs every rank: a rank outside the one its peers wait in
is the culprit. An **engine-to-worker call** (a step, ``collective_rpc``) is a rank's engine
core waiting for its *own* workers: the rank still inside one while its peers have returned is
the slow one, never its peers. Inside a step, the workers' view (the worker board: the call a
worker is in, the DP/EP collective of the forward it waits in, its sequence number and its
heartbeat) tells which rank's workers never reached the collective the others wait in.

Any doubt about what was read comes first and is a verdict of its own, never ``healthy``:

0. a target that answers with something that is not an exposition of our series (another
   service on the port, a page, garbage, our telemetry's frozen defaults) is
   ``not_dp_endpoint``; ranks of two deployments (``model_name``), of different DP sizes, or two
   targets showing one engine are ``mixed``; fewer ranks than their own ``vllm_dp_size`` (or
   none) is ``incomplete``, naming the missing engines. The ranks that were read are still
   diagnosed, in the details.

Then, in order:

1. a rank that does not answer is a culprit (dead or wedged), its peers are victims;
2. a rank with a frozen worker (no heartbeat for ``threshold``: stopped, or a C call holding
   the GIL) while the group has work is a culprit;
3. ranks waiting in *different* collectives, one of them cross-rank, is a deadlock (#36594:
   one rank in the barrier, another stepping while its worker waits in a model collective);
   but a rank inside a step whose workers are *not* in a model collective is simply wedged
   in its forward: a culprit, and the ranks waiting in the cross-rank collective its victims;
4. ranks waiting in one cross-rank collective while others are not inside it: the others are
   culprits (they never arrived), the waiting ranks victims;
5. with the workers' view: ranks whose workers wait in a model collective while another
   rank's workers are not inside one (or are behind by sequence number): that rank is the
   culprit. All ranks' workers in the same collective with no progress: ``wedged`` (the
   collective network or a peer outside this view), naming the collective;
6. ranks inside an engine-to-worker call while their peers returned from theirs: those ranks
   are culprits; all ranks inside a step with no progress: ``wedged``;
7. work in flight, no progress anywhere, nobody inside anything: ``wedged`` (never healthy);
8. a two-phase pause that consensus should have reached but did not (``not_converging``): a
   rank pending for ``threshold`` while a peer runs without voting (the pause was fanned out
   to some engines only), or pending through ``MAX_PENDING_ROUNDS`` sync rounds between two
   samples (every round a vote without consensus). Names the ranks that never voted and for
   how long the others have pended;
9. with rates from two samples: a rank whose workers (or, without workers, whose engine)
   hardly wait while their peers mostly wait in collectives is a straggler (``slow``), with a
   straggler score (its wait share over its peers' median; 1.0 keeps pace);
10. otherwise healthy (idle when no work is in flight anywhere), pausing or paused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from instrumented_core.telemetry.names import (
    COLLECTIVE_STEP,
    COLLECTIVE_SYNC,
    CROSS_RANK_COLLECTIVES,
    ENGINE_TO_WORKER_CALLS,
)

VERDICTS = ("healthy", "pausing", "paused", "stuck", "deadlock", "wedged", "slow",
            "not_converging", "incomplete", "mixed", "not_dp_endpoint", "unobserved")
#: Verdicts about what was read rather than about the ranks: the doctor cannot vouch for them.
DOUBT_VERDICTS = ("incomplete", "mixed", "not_dp_endpoint", "unobserved")
#: How a rank's endpoint failed to answer (``RankView.no_answer``), in words. The first three
#: are told apart by the TCP exchange: no connection at all, a connection and no answer (the
#: kernel still accepts for a frozen process), or a refusal (nothing listens).
NO_ANSWER = {
    "unreachable": "unreachable from the monitor (no connection: its host is partitioned or "
                   "down, or the monitor's path to it is cut)",
    "unresponsive": "unresponsive (its port accepts, no answer in time: the process is frozen, "
                    "e.g. SIGSTOP, or a C call holds its GIL; not dead)",
    "refused": "down (connection refused: nothing serves its port, its process is gone)",
    "timeout": "not answering in time (frozen, or its host unreachable: the scraper cannot "
               "say which)",
    "": "no answer from its metrics endpoint (dead or wedged)",
}
NO_ANSWER_SHORT = {"unreachable": "no connection from the monitor",
                   "unresponsive": "unresponsive (connects, never answers)",
                   "refused": "down (connection refused)",
                   "timeout": "no answer in time", "": "dead or wedged"}
#: Sync rounds a rank may pend through: consensus takes one round once every rank has voted,
#: one more if the request reached a rank just after a round began.
MAX_PENDING_ROUNDS = 3


@dataclass(frozen=True)
class RankView:
    rank: int
    reachable: bool = True
    phase: str = "running"
    collective: str | None = None
    inside_seconds: float = 0.0
    progress_age: float = 0.0
    engines_running: bool = False
    wait_fraction: float | None = None  # share of wall time inside collectives, from rates
    steps_until_sync: int | None = None
    #: requests running + waiting in the rank's scheduler (None: the engine cannot say)
    requests: int | None = None
    #: worker records the rank's endpoint showed (0: no view into its workers)
    workers: int = 0
    #: the engine-to-worker call its longest-inside worker is in, and for how long
    worker_call: str | None = None
    worker_call_seconds: float = 0.0
    #: the DP/EP model collective ALL its workers wait in (None if any worker is not in one),
    #: the shortest time among them, and the lowest sequence number among its workers
    model_collective: str | None = None
    model_collective_seconds: float = 0.0
    model_collective_seq: int | None = None
    #: the oldest heartbeat among its workers, in seconds (a frozen worker's grows)
    worker_heartbeat_age: float = 0.0
    #: share of wall time its workers waited inside model collectives, from rates
    model_wait_fraction: float | None = None
    #: model collectives its slowest worker entered between the two samples (from rates)
    model_collectives_advanced: int | None = None
    #: where it was read (host:port, a Prometheus instance), for messages
    source: str = ""
    #: why an unreachable rank gave no answer: a key of ``NO_ANSWER`` ("": not known)
    no_answer: str = ""
    #: why the target that answered is not a vLLM DP endpoint of ours (None: it is one)
    not_endpoint: str | None = None
    #: the plugin is off on this rank (a status-only endpoint): its reason, e.g.
    #: ``contract_mismatch (vLLM 0.20.2)``; ``rank`` is then the engine that endpoint names
    plugin_off: str | None = None
    #: the rank's own ``vllm_dp_size``, deployment (``model_name``) and pause protocol
    dp_size: int | None = None
    deployment: str | None = None
    protocol: str | None = None
    #: seconds since its pending pause began (None: not pending, or the rank cannot say)
    pending_seconds: float | None = None
    #: sync rounds it completed between two samples that show the same pending pause
    pending_sync_rounds: int | None = None


@dataclass(frozen=True)
class WorkerNow:
    """One worker of a rank as read now (from its engine's ``/metrics`` or straight from the
    worker board): what it is inside, for how long, its sequence number and heartbeat age."""

    call: str  # "" when not inside a call from its engine core
    call_seconds: float
    collective: str  # "" when not inside a model collective
    collective_seconds: float
    seq: int
    heartbeat_age: float


def worker_fields(workers: list[WorkerNow]) -> dict:
    """The ``RankView`` fields of a rank's workers (none: no fields), one rule for the rank's
    endpoint (``WorkerBoardCollector`` serves the model-collective fields once per rank, and
    the doctor reads them back) and the CPU cluster's own hang report: the call of the worker
    inside one longest, the oldest heartbeat, the lowest sequence number, and a model
    collective only when every worker is inside one (the shortest time among them)."""
    if not workers:
        return {}
    longest = max(workers, key=lambda w: w.call_seconds)
    fields: dict = {
        "workers": len(workers),
        "worker_call": longest.call if longest.call and longest.call_seconds > 0 else None,
        "worker_call_seconds": longest.call_seconds,
        "worker_heartbeat_age": max(w.heartbeat_age for w in workers),
        "model_collective_seq": min(w.seq for w in workers),
    }
    if all(w.collective and w.collective_seconds > 0 for w in workers):
        first = min(workers, key=lambda w: w.collective_seconds)
        fields["model_collective"] = first.collective
        fields["model_collective_seconds"] = first.collective_seconds
    return fields


@dataclass
class Verdict:
    kind: str
    culprits: list[int] = field(default_factory=list)
    victims: list[int] = field(default_factory=list)
    summary: str = ""
    details: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return self.kind in ("healthy", "pausing", "paused")

    @property
    def doubtful(self) -> bool:
        """What was read cannot be vouched for (incomplete, mixed, not a DP endpoint)."""
        return self.kind in DOUBT_VERDICTS

    def as_dict(self) -> dict:
        return {"verdict": self.kind, "culprit_ranks": self.culprits,
                "victim_ranks": self.victims, "summary": self.summary, "details": self.details}


def _ranks(views) -> str:
    ranks = [v.rank for v in views]
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)


def _worker_where(v: RankView) -> str:
    """Where a rank's workers are, in words (empty without a worker view)."""
    if not v.workers:
        return ""
    if v.model_collective:
        return (f"its workers wait in {v.model_collective} #{v.model_collective_seq} for "
                f"{v.model_collective_seconds:.1f} s")
    if v.worker_call:
        return (f"its workers are inside {v.worker_call} for {v.worker_call_seconds:.1f} s, "
                "in no model collective")
    return "its workers are outside any call from the engine core"


def _detail(v: RankView) -> str:
    parts = [f"rank {v.rank} ({v.phase})"]
    if v.collective:
        parts.append(f"inside {v.collective} for {v.inside_seconds:.1f} s")
    else:
        parts.append(f"no progress for {v.progress_age:.1f} s")
    where = _worker_where(v)
    if where:
        parts.append(where)
    if v.worker_heartbeat_age:
        parts.append(f"worker heartbeat {v.worker_heartbeat_age:.1f} s old")
    if v.requests is not None:
        parts.append(f"{v.requests} requests in flight")
    return ", ".join(parts)


def _has_work(v: RankView) -> bool:
    return bool(v.engines_running or (v.requests or 0) > 0)


def diagnose(views: list[RankView], threshold: float = 2.0) -> Verdict:
    """Verdict for one deployment; ``threshold`` seconds inside a collective means waiting."""
    views = sorted(views, key=lambda v: v.rank)
    doubt = _doubt(views, threshold)
    return doubt if doubt is not None else _diagnose(views, threshold)


def _where(v: RankView) -> str:
    return f"rank {v.rank}" + (f" ({v.source})" if v.source else "")


def _engines(numbers) -> str:
    numbers = sorted(numbers)
    return ("engine " if len(numbers) == 1 else "engines ") + ", ".join(map(str, numbers))


def _doubt(views: list[RankView], threshold: float) -> Verdict | None:
    """Rule 0: what was read is not one whole deployment of vLLM DP endpoints."""
    if not views:
        return Verdict("incomplete", summary="incomplete: no ranks to diagnose (no target "
                       "given, or none exports this deployment's series)")
    foreign = [v for v in views if v.reachable and v.not_endpoint]
    ranks = [v for v in views if not v.not_endpoint]
    if foreign:
        what = "; ".join(_foreign(v) for v in foreign)
        if not all(v.plugin_off for v in foreign):
            what = f"not a vLLM DP endpoint: {what}"
        return Verdict("not_dp_endpoint", summary=what,
                       details=[*(f"{v.source or f'target {v.rank}'} answered, but {v.not_endpoint}"
                                  for v in foreign), *_rest(ranks, threshold)])
    known = [v for v in views if v.reachable and v.dp_size is not None]
    deployments = sorted({v.deployment for v in known if v.deployment is not None})
    if len(deployments) > 1:
        parts = "; ".join(f"{d!r}: {_ranks([v for v in known if v.deployment == d])}"
                          for d in deployments)
        return Verdict("mixed", summary=f"mixed: ranks of {len(deployments)} deployments "
                       f"(model_name {parts}): diagnose one deployment at a time")
    sizes = sorted({v.dp_size for v in known if v.dp_size is not None})
    if len(sizes) > 1:
        parts = "; ".join(f"{s}: {_ranks([v for v in known if v.dp_size == s])}" for s in sizes)
        return Verdict("mixed", summary=f"mixed: the ranks disagree on the DP size ({parts})")
    seen: dict[int, list[RankView]] = {}
    for v in known:
        seen.setdefault(v.rank, []).append(v)
    twice = {r: vs for r, vs in seen.items() if len(vs) > 1}
    if twice:
        parts = "; ".join(f"engine {r} on " + ", ".join(v.source for v in vs)
                          for r, vs in sorted(twice.items()))
        return Verdict("mixed", summary=f"mixed: one engine on several targets ({parts}): "
                       "targets of two deployments, or one given twice")
    if not sizes:
        return None
    size = sizes[0]
    outside = sorted(r for r in seen if r >= size)
    if outside:
        return Verdict("mixed", summary=f"mixed: {_engines(outside)} outside the DP size "
                       f"{size} the ranks report")
    if len(views) < size:
        missing = sorted(set(range(size)) - set(seen))
        dead = len(views) - len(known)
        named = (f"{_engines(missing)} not among the targets" if not dead else
                 f"{_engines(missing)} did not answer or are not among the targets")
        return Verdict("incomplete", summary=f"incomplete: {len(views)} of {size} ranks; {named}",
                       details=_rest(views, threshold))
    if len(views) > size:
        return Verdict("mixed", summary=f"mixed: {len(views)} targets for a DP size of {size} "
                       f"({len(views) - len(known)} of them did not answer)")
    return None


def _foreign(v: RankView) -> str:
    if v.plugin_off:  # our endpoint, but the plugin does not observe that engine
        return f"plugin off on {_where(v)}: {v.plugin_off}"
    return f"{v.source or f'target {v.rank}'}: {v.not_endpoint}"


def _host(v: RankView) -> str:
    """The host part of where a rank was read (``10.0.0.12:8103`` -> ``10.0.0.12``)."""
    host = v.source.rsplit(":", 1)[0] if ":" in v.source else v.source
    return host.strip("[]")


def _no_answer(dead: list[RankView], live: list[RankView], total: int,
               threshold: float) -> Verdict:
    """Rule 1: ranks whose endpoints do not answer, named by how they failed and where.

    Only "unreachable from the monitor" can leave the ranks themselves fine: when their peers
    keep making progress and none waits in a cross-rank collective, the sync rounds that need
    every rank still complete, so the unreachable ranks still step; the monitor's path to them
    is what broke (``unobserved``, a doubt). Otherwise the ranks that do not answer are the
    culprits and the live ranks, named with the collective they wait in, the victims."""
    def blocked_in(v: RankView) -> str:
        """The collective a live rank has been held in for ``threshold`` ("" if none)."""
        if v.collective in CROSS_RANK_COLLECTIVES and v.inside_seconds >= threshold:
            return v.collective
        if v.model_collective and v.model_collective_seconds >= threshold:
            return f"a step (its workers in the model collective {v.model_collective})"
        if v.collective and v.inside_seconds >= threshold:
            return f"{v.collective} (an engine-to-worker call)"
        return ""

    waiting = [v for v in live if blocked_in(v)]
    progressing = [v for v in live if v.progress_age < threshold]
    groups: dict[tuple[str, str], list[RankView]] = {}
    for v in dead:
        groups.setdefault((v.no_answer if v.no_answer in NO_ANSWER else "", _host(v)),
                          []).append(v)
    where = "; ".join(f"{_ranks(vs)} unreachable: {NO_ANSWER_SHORT[kind]}"
                      + (f" (host {host})" if host else "")
                      for (kind, host), vs in sorted(groups.items()))
    details = [f"rank {v.rank} ({v.source or 'no address'}): "
               f"{NO_ANSWER.get(v.no_answer, NO_ANSWER[''])}" for v in dead]
    details += [_detail(v) for v in waiting]
    if (live and all(v.no_answer == "unreachable" for v in dead) and not waiting
            and len(progressing) == len(live) and any(_has_work(v) for v in live)):
        return Verdict("unobserved", [v.rank for v in dead], [],
                       f"{where}, but their {len(live)} peers keep stepping (no sync round "
                       "waits on them), so they still step: the monitor's path to that host "
                       "is cut, not the ranks", details)
    pronoun = "it" if len(dead) == 1 else "them"
    by_place: dict[str, list[RankView]] = {}
    for v in waiting:
        by_place.setdefault(blocked_in(v), []).append(v)
    held = ", ".join(f"{_ranks(vs)} {'waits' if len(vs) == 1 else 'wait'} for {pronoun} "
                     f"in {place}" for place, vs in sorted(
                         by_place.items(), key=lambda kv: (kv[0] != COLLECTIVE_SYNC, kv[0])))
    stopped = (f"; {'it' if len(dead) == 1 else 'they'} stopped stepping: {held}"
               if waiting else "")
    return Verdict("stuck", [v.rank for v in dead], [v.rank for v in live],
                   f"{where}; {len(live)} of {total} ranks answer{stopped}", details)


def _rest(views: list[RankView], threshold: float) -> list[str]:
    """The verdict on the ranks that were read, as details of a doubtful one."""
    if not views:
        return []
    inner = _diagnose(views, threshold)
    return [f"among the {len(views)} ranks read: {inner.kind.upper()}: {inner.summary}",
            *inner.details]


def _diagnose(views: list[RankView], threshold: float) -> Verdict:
    dead = [v for v in views if not v.reachable]
    live = [v for v in views if v.reachable]
    if dead:
        return _no_answer(dead, live, len(views), threshold)

    busy = any(_has_work(v) for v in live)
    frozen = [v for v in live if v.workers and v.worker_heartbeat_age >= threshold]
    if frozen and busy:
        others = [v for v in live if v not in frozen]
        what = "; ".join(
            f"rank {v.rank} ({v.phase}): a worker frozen for {v.worker_heartbeat_age:.1f} s "
            f"(no heartbeat: stopped, or a call holding the GIL)"
            + (f"; {_worker_where(v)}" if _worker_where(v) else "") for v in frozen)
        return Verdict("stuck", [v.rank for v in frozen], [v.rank for v in others],
                       what, [_detail(v) for v in live])

    waiting = [v for v in live if v.collective and v.inside_seconds >= threshold]
    cross = [v for v in waiting if v.collective in CROSS_RANK_COLLECTIVES]
    calls = [v for v in waiting if v.collective in ENGINE_TO_WORKER_CALLS]
    details = [_detail(v) for v in waiting]

    if cross:
        groups: dict[str, list[RankView]] = {}
        for v in waiting:
            groups.setdefault(v.collective or "", []).append(v)
        if len(groups) > 1:
            # A step whose workers are not in a model collective is a rank wedged in its
            # forward (its peers wait for it in the cross-rank collective), not a mismatch.
            wedged_steps = [v for v in calls if v.workers and v.model_collective is None]
            if wedged_steps and len(wedged_steps) == len(calls):
                return _culprits_inside_calls(wedged_steps, cross, details)
            culprits = [v for v in groups.get(COLLECTIVE_STEP, []) if v.phase != "running"]
            if not culprits:
                culprits = min(groups.values(), key=len)
            victims = [v.rank for v in waiting if v not in culprits]
            parts = "; ".join(f"{_ranks(g)} in {c}" for c, g in sorted(groups.items()))
            return Verdict("deadlock", [v.rank for v in culprits], victims,
                           f"mismatched collectives: {parts}", details)
        (collective, inside), = groups.items()
        absent = [v for v in live if v not in inside]
        if absent:
            longest = max(v.inside_seconds for v in inside)
            stalled = "; ".join(_absent_phrase(v) for v in absent)
            return Verdict("stuck", [v.rank for v in absent], [v.rank for v in inside],
                           f"{stalled} never entered {collective}; {_ranks(inside)} waiting "
                           f"inside it for up to {longest:.1f} s", details)
        return Verdict("stuck", [], [v.rank for v in inside],
                       f"all ranks inside {collective} for over {threshold:.0f} s", details)

    verdict = _inside_the_forward(live, threshold)
    if verdict is not None:
        return verdict

    if calls:
        by_call: dict[str, list[RankView]] = {}
        for v in calls:
            by_call.setdefault(v.collective or "", []).append(v)
        for call, inside in by_call.items():
            returned = [v for v in live if v.collective != call]
            if returned:
                return _culprits_inside_calls(inside, returned, [_detail(v) for v in live])
        call, inside = next(iter(by_call.items()))
        longest = max(v.inside_seconds for v in inside)
        if call == COLLECTIVE_STEP and all(v.progress_age >= threshold for v in live):
            return Verdict("wedged", [], [],
                           f"wedged: all {len(live)} ranks inside step for up to "
                           f"{longest:.1f} s with no progress; no model collective visible"
                           f"{_in_flight(live)}", [_detail(v) for v in live])
        return Verdict("stuck", [], [v.rank for v in inside],
                       f"all ranks inside {call} for over {threshold:.0f} s (up to "
                       f"{longest:.1f} s: a long call such as a weight load, or a hang inside "
                       "it)", details)

    if busy and all(v.progress_age >= threshold for v in live) and any(
            (v.requests or 0) > 0 and v.phase != "paused" for v in live):
        oldest = min(v.progress_age for v in live)
        return Verdict("wedged", [], [],
                       f"wedged: no progress on any rank for {oldest:.1f} s with work in flight"
                       f"{_in_flight(live)}; no collective visible",
                       [_detail(v) for v in live])

    diverging = _not_converging(live, threshold)
    if diverging is not None:
        return diverging

    slow = _straggler(live, threshold)
    if slow is not None:
        return slow

    pending = [v for v in live if v.phase == "pending_pause"]
    paused = [v for v in live if v.phase == "paused"]
    if pending:
        due = min((v.steps_until_sync for v in pending if v.steps_until_sync is not None),
                  default=None)
        tail = f"; next sync round in {due} steps" if due is not None else ""
        return Verdict("pausing", summary=f"pausing: {len(pending)} of {len(live)} ranks "
                       f"pending{tail}")
    if paused and len(paused) == len(live):
        return Verdict("paused", summary=f"paused: all {len(live)} ranks reached consensus")
    if not busy and all(v.requests is not None for v in live):
        return Verdict("healthy", summary=f"healthy: {len(live)} ranks, idle (no requests in "
                       "flight)")
    return Verdict("healthy", summary=f"healthy: {len(live)} ranks{_in_flight(live)}")


def _in_flight(live: list[RankView]) -> str:
    known = [v.requests for v in live if v.requests is not None]
    return f", {sum(known)} requests in flight" if known else ""


def _absent_phrase(v: RankView) -> str:
    if v.collective in ENGINE_TO_WORKER_CALLS and v.inside_seconds:
        where = _worker_where(v)
        return (f"rank {v.rank} ({v.phase}, inside {v.collective} for {v.inside_seconds:.1f} s"
                + (f"; {where}" if where else "") + ")")
    return f"rank {v.rank} ({v.phase}, no progress for {v.progress_age:.1f} s)"


def _culprits_inside_calls(inside: list[RankView], others: list[RankView],
                           details: list[str]) -> Verdict:
    """Ranks still inside a call to their own workers while the others returned."""
    phrases = []
    for v in inside:
        where = _worker_where(v)
        phrases.append(f"rank {v.rank} ({v.phase}) still inside {v.collective} after "
                       f"{v.inside_seconds:.1f} s" + (f" ({where})" if where else
                                                      " (its workers have not returned)"))
    waiting = [v for v in others if v.collective in CROSS_RANK_COLLECTIVES]
    tail = (f"; {_ranks(waiting)} waiting for it in {waiting[0].collective}" if waiting
            else f"; {_ranks(others)} returned from theirs")
    return Verdict("stuck", [v.rank for v in inside], [v.rank for v in waiting],
                   "; ".join(phrases) + tail, details)


def _inside_the_forward(live: list[RankView], threshold: float) -> Verdict | None:
    """Rule 5: the workers' view inside a step (every rank must have workers on the board)."""
    if not all(v.workers for v in live):
        return None
    in_coll = [v for v in live if v.model_collective and v.model_collective_seconds >= threshold]
    if not in_coll:
        return None
    details = [_detail(v) for v in live]
    outside = [v for v in live if v not in in_coll]
    coll = max(in_coll, key=lambda v: v.model_collective_seconds)
    name = f"{coll.model_collective} #{coll.model_collective_seq}"
    if outside:
        phrases = []
        for v in outside:
            if v.model_collective:
                where = (f"only entered {v.model_collective} #{v.model_collective_seq} "
                         f"{v.model_collective_seconds:.1f} s ago")
            elif v.worker_call:
                where = f"inside {v.worker_call} for {v.worker_call_seconds:.1f} s"
            else:
                where = "stopped outside any call from its engine core"
                if v.collective == COLLECTIVE_STEP:
                    where += f" (engine inside step for {v.inside_seconds:.1f} s)"
            phrases.append(f"rank {v.rank} ({v.phase}): its worker is not in the model "
                           f"collective its peers wait in; {where}")
        return Verdict("stuck", [v.rank for v in outside], [v.rank for v in in_coll],
                       "; ".join(phrases) + f"; {_ranks(in_coll)} waiting in {name} for up to "
                       f"{coll.model_collective_seconds:.1f} s", details)
    seqs = {v.model_collective_seq for v in in_coll}
    if len(seqs) > 1:
        low = min(s for s in seqs if s is not None)
        behind = [v for v in in_coll if v.model_collective_seq == low]
        ahead = [v for v in in_coll if v not in behind]
        lead = max(ahead, key=lambda v: v.model_collective_seq or 0)
        return Verdict("stuck", [v.rank for v in behind], [v.rank for v in ahead],
                       f"{_ranks(behind)} behind: its workers are still in "
                       f"{behind[0].model_collective} #{low} while {_ranks(ahead)} wait in "
                       f"{lead.model_collective} #{lead.model_collective_seq}", details)
    if all(v.progress_age >= threshold for v in live):
        shortest = min(v.model_collective_seconds for v in in_coll)
        return Verdict("wedged", [], [],
                       f"wedged: all {len(live)} ranks' workers inside {name} for "
                       f"{shortest:.1f} s with no progress: the collective network or a peer "
                       f"outside this view{_in_flight(live)}", details)
    return None


def _not_converging(live: list[RankView], threshold: float) -> Verdict | None:
    """Rule 8: a two-phase pause that should have reached consensus by now."""
    pending = [v for v in live if v.phase == "pending_pause" and v.protocol != "legacy"]
    if not pending:
        return None
    # a peer that stopped progressing is not a missing vote: its peers will wait for it in
    # sync_dp_state, and rule 4 names it there
    never = [v for v in live if v.phase == "running" and v.progress_age < threshold]
    longest = max((v.pending_seconds or 0.0 for v in pending), default=0.0)
    rounds = max((v.pending_sync_rounds or 0 for v in pending), default=0)
    if not ((never and longest >= threshold) or rounds >= MAX_PENDING_ROUNDS):
        return None
    how_long = f"for {longest:.1f} s" if longest else "since before the first sample"
    through = (f", {rounds} sync rounds without consensus between two samples"
               if rounds >= MAX_PENDING_ROUNDS else "")
    details = [_pending_detail(v) for v in live]
    if never:
        return Verdict("not_converging", [v.rank for v in never], [v.rank for v in pending],
                       f"not converging: {_ranks(never)} never voted to pause (running: no "
                       f"pause request reached {'it' if len(never) == 1 else 'them'}); "
                       f"{_ranks(pending)} pending {how_long}{through}; consensus takes one "
                       "sync round once every rank has voted", details)
    return Verdict("not_converging", [], [v.rank for v in pending],
                   f"not converging: {_ranks(pending)} pending {how_long}{through}, and no "
                   "rank runs without a vote: a vote is not reaching the all-reduce", details)


def _pending_detail(v: RankView) -> str:
    if v.phase != "pending_pause":
        return f"rank {v.rank} ({v.phase}): no pause vote"
    parts = [f"rank {v.rank} (pending_pause)"]
    if v.pending_seconds is not None:
        parts.append(f"pending for {v.pending_seconds:.1f} s")
    if v.pending_sync_rounds is not None:
        parts.append(f"{v.pending_sync_rounds} sync rounds between two samples")
    if v.steps_until_sync is not None:
        parts.append(f"next sync round in {v.steps_until_sync} steps")
    return ", ".join(parts)


def _straggler(live: list[RankView], threshold: float) -> Verdict | None:
    """Rule 8: the rank that waits least while its peers mostly wait."""
    rated: list[tuple[RankView, float]]
    with_workers = [(v, v.model_wait_fraction) for v in live
                    if v.model_wait_fraction is not None and _has_work(v)]
    if len(with_workers) >= 2 and len(with_workers) == len(live):
        rated = with_workers
        # a straggler still completes its calls; a worker that stopped (in a call for a while)
        # is about to be named stuck, not slow
        where, floor, max_age = "its workers wait", 0.3, min(threshold / 2, 1.0)
    else:
        rated = [(v, v.wait_fraction) for v in live
                 if v.wait_fraction is not None and v.engines_running]
        # a rank that stopped progressing is not slow but (about to be) stuck: wait for it
        # to cross the waiting threshold instead of calling it a straggler
        where, floor, max_age = "it waits", 0.5, min(threshold / 2, 0.25)
    if len(rated) < 2:
        return None
    slowest, low = min(rated, key=lambda r: r[1])
    others = sorted(f for v, f in rated if v is not slowest)
    median = others[len(others) // 2]
    # a straggler still gets through the collectives, late; one that entered none in the
    # window has stopped: it will be named stuck once its peers wait past the threshold
    advancing = slowest.model_collectives_advanced is None or slowest.model_collectives_advanced > 0
    if (median >= floor and low <= median / 2 and slowest.progress_age < max_age
            and slowest.worker_call_seconds < max_age and advancing):
        score = low / median if median else 1.0
        return Verdict("slow", [slowest.rank], [v.rank for v, _ in rated if v is not slowest],
                       f"rank {slowest.rank} is a straggler: {where} {low:.0%} of the time in "
                       f"collectives while its peers wait {median:.0%} (straggler score "
                       f"{score:.2f}; 1.0 keeps pace)")
    return None


def verdict_matches(kind: str, culprits: list[int], expected_kind: str,
                    expected_culprits: list[int]) -> bool:
    """Whether a verdict is the expected one: the demos' exit status, the report's "as
    expected" badge and the demos' wait for a settled verdict all decide it here. Expecting
    healthy accepts any healthy kind (a pause may be in flight); a deadlock's culprits depend
    on which rank the late wave woke, so only its kind must match."""
    if expected_kind == "healthy":
        return kind in ("healthy", "pausing", "paused")
    return kind == expected_kind and (expected_kind == "deadlock"
                                      or list(culprits) == list(expected_culprits))
