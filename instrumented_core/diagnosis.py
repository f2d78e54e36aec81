"""From per-rank observations to a verdict that names the culprit rank.

One pure function serves the cluster's hang report (fed from its shared-memory status
board), ``instrumented-core doctor`` (fed from live ``/metrics``) and the demo's summary, so
all three always agree on who is stuck.

Rules, in order:
- a rank that does not answer is a culprit (dead or wedged), its peers are victims;
- ranks waiting in *different* collectives for longer than the threshold is a deadlock
  (#36594: one rank in the barrier, another in a step); the culprits are the ranks inside a
  step collective although paused (woken by a late START_DP_WAVE), else the smaller group;
- ranks waiting in one collective while others are not inside it: the others are culprits
  (they never arrived: stalled), the waiting ranks are victims;
- with rates from two samples: a rank that hardly waits while its peers mostly wait inside
  collectives is a straggler (slow);
- otherwise healthy, pausing (some ranks pending) or paused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

VERDICTS = ("healthy", "pausing", "paused", "stuck", "deadlock", "slow")


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

    def as_dict(self) -> dict:
        return {"verdict": self.kind, "culprit_ranks": self.culprits,
                "victim_ranks": self.victims, "summary": self.summary, "details": self.details}


def _ranks(views) -> str:
    ranks = [v.rank for v in views]
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)


def diagnose(views: list[RankView], threshold: float = 2.0) -> Verdict:
    """Verdict for one deployment; ``threshold`` seconds inside a collective means waiting."""
    views = sorted(views, key=lambda v: v.rank)
    dead = [v for v in views if not v.reachable]
    live = [v for v in views if v.reachable]
    if dead:
        victims = [v.rank for v in live]
        return Verdict("stuck", [v.rank for v in dead], victims,
                       f"{_ranks(dead)} unreachable (dead or wedged); {len(victims)} of "
                       f"{len(views)} ranks answer",
                       [f"rank {v.rank}: no answer from its metrics endpoint" for v in dead])

    waiting = [v for v in live if v.collective and v.inside_seconds >= threshold]
    if waiting:
        groups: dict[str, list[RankView]] = {}
        for v in waiting:
            groups.setdefault(v.collective, []).append(v)
        details = [f"rank {v.rank} ({v.phase}) inside {v.collective} for {v.inside_seconds:.1f} s"
                   for v in waiting]
        if len(groups) > 1:
            culprits = [v for v in groups.get("step", []) if v.phase != "running"]
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
            stalled = ", ".join(
                f"rank {v.rank} ({v.phase}, no progress for {v.progress_age:.1f} s)"
                for v in absent)
            return Verdict("stuck", [v.rank for v in absent], [v.rank for v in inside],
                           f"{stalled} never entered {collective}; {_ranks(inside)} waiting "
                           f"inside it for up to {longest:.1f} s", details)
        return Verdict("stuck", [], [v.rank for v in inside],
                       f"all ranks inside {collective} for over {threshold:.0f} s", details)

    rated = [v for v in live if v.wait_fraction is not None and v.engines_running]
    if len(rated) >= 2:
        slowest = min(rated, key=lambda v: v.wait_fraction)
        others = sorted(v.wait_fraction for v in rated if v is not slowest)
        median = others[len(others) // 2]
        # a rank that stopped progressing is not slow but (about to be) stuck: wait for it
        # to cross the waiting threshold instead of calling it a straggler
        if (median >= 0.5 and slowest.wait_fraction <= median / 2
                and slowest.progress_age < min(threshold / 2, 0.25)):
            return Verdict("slow", [slowest.rank], [v.rank for v in rated if v is not slowest],
                           f"rank {slowest.rank} is a straggler: it waits "
                           f"{slowest.wait_fraction:.0%} of the time in collectives while its "
                           f"peers wait {median:.0%}")

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
    return Verdict("healthy", summary=f"healthy: {len(live)} ranks")
