"""``instrumented-core demo``: a scripted story on a live engine, watched through its metrics.

Story: traffic; pause(keep) -> barrier on engine 0 -> request routed to engine 1 -> barrier on
the others -> resume (vLLM's ``test_dp_pause_barrier_request_deadlock``, from
:mod:`instrumented_core.scenarios`); more traffic; then the injected fault on one rank. The
verdict comes from the ranks' own ``/metrics`` through the doctor's logic, so the demo proves
what an operator would see.

One story runner (:func:`run_story`) tells it on any engine through a :class:`DemoEngine`
adapter: the CPU cluster's is :class:`ClusterEngine` here, real vLLM's is in
:mod:`instrumented_core.vllm_support.demo`. The runner owns the live view, the diagnosis loop,
stopping (every signal takes the engine's process tree down, :mod:`.stopping`) and the run's
files; an adapter only starts its engine, supplies traffic and injects its faults.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from instrumented_core.cluster import Cluster, ClusterConfig, ClusterError, CollectiveHang
from instrumented_core.cluster.netns import Lab, enter_netns, leave_netns
from instrumented_core.diagnosis import verdict_matches
from instrumented_core.doctor import run_doctor
from instrumented_core.recorder import Recorder
from instrumented_core.run_files import FLIGHT_DIR, REPORT, SPANS, SUMMARY
from instrumented_core.scenarios import (
    ClusterClient,
    PauseClient,
    ScenarioHang,
    staggered_barrier,
)
from instrumented_core.stopping import Stopped, TreeWatchdog, stop_signals
from instrumented_core.telemetry import TelemetryConfig

PROG = "instrumented-core"


@dataclass
class DemoOptions:
    ranks: int = 4
    protocol: str = "two-phase"
    cadence: str = "fixed"
    fault: str = "stall"
    fault_rank: int | None = None
    sync_interval: int = 16
    duration: float = 20.0
    seed: int | None = None
    out: str = "demo-out"
    live: bool = True
    metrics_port_base: int | None = None
    debug_endpoint: bool = True
    hold: float = 0.0  # keep the cluster (and the fault) up this long after the verdict
    hosts: int = 0  # >= 2: the ranks spread over that many network-namespace hosts (the lab)


class Story:
    """Progress of the scripted story, shown in the live view and logged to events.jsonl."""

    STEPS = ("start", "traffic", "pause(keep)", "staggered barrier + routed request",
             "barrier + resume", "more traffic", "fault", "verdict")

    def __init__(self, recorder: Recorder | None, log) -> None:
        self.recorder = recorder
        self.log = log
        self.current = "start"
        self.lines: list[str] = []

    def step(self, name: str, text: str, **fields) -> None:
        self.current = name
        self.note(text, **fields)

    def note(self, text: str, **fields) -> None:
        self.lines.append(text)
        if self.recorder is not None:
            self.recorder.event(text, step=self.current, **fields)
        self.log(text)


#: Faults that hit every rank at once (injected on all ranks, no culprit to name).
GROUP_FAULTS = ("wedge",)
#: The ranks' watchdog threshold in the demo (unless set in the environment): above the
#: story's 1.5 s staggered barrier, below its 6 s hang timeout, so a hang leaves its dumps
#: (and report.html its flight-recorder analysis) before the cluster is stopped.
DEMO_WATCHDOG_SECONDS = 3.0


def _expected(options: DemoOptions, fault_rank: int) -> tuple[str, list[int]]:
    if options.protocol == "legacy":
        return "deadlock", []
    return {"none": ("healthy", []), "stall": ("stuck", [fault_rank]),
            "dead": ("stuck", [fault_rank]), "slow": ("slow", [fault_rank]),
            "worker_stall": ("stuck", [fault_rank]), "worker_slow": ("slow", [fault_rank]),
            "wedge": ("wedged", []), "freeze": ("stuck", [fault_rank])}[options.fault]


class DemoTraffic(Protocol):
    """Background requests an engine supplies to the story."""

    enabled: bool

    async def finish(self) -> list[str] | None: ...  # finish reasons, None: not tracked

    def cancel(self) -> None: ...


@dataclass
class Plan:
    """What the runner decided before the engine exists."""

    options: DemoOptions
    seed: int
    rng: random.Random
    fault_rank: int
    out_dir: Path
    expected: tuple[str, list[int]]


@dataclass
class StoryState:
    """What the story has so far; the summary is written from it whatever ends the run."""

    pauses: int = 0
    verdict: Any = None


class DemoEngine(Protocol):
    """An engine as the story runner drives it (the CPU cluster, real vLLM)."""

    metrics_urls: list[str]  # per rank, once started
    first_wait: float  # staggered barrier: engine 0's barrier -> routed request
    gap: float  # routed request -> the other engines' barriers
    fault_deadline: float  # how long the doctor may take to name the injected fault

    def describe(self) -> str: ...  # the "starting ..." line

    def start(self, out: Callable[[str], None]) -> None: ...

    def run(self, story: Coroutine[Any, Any, None], budget: float) -> None: ...

    def client(self) -> PauseClient: ...

    async def warm_up(self) -> None: ...

    def traffic(self, rng: random.Random) -> DemoTraffic: ...

    async def inject(self, story: Story, state: StoryState,
                     traffic: DemoTraffic) -> Callable[[], Awaitable[None]]: ...

    def close(self) -> None: ...

    def summary_fields(self) -> dict[str, Any]: ...


def _live_view(recorder: Recorder, story: Story, urls: list[str]):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    def render():
        table = Table(title="DP ranks (from /metrics)", expand=False)
        for col in ("rank", "phase", "wave", "steps real/dummy", "sync rounds",
                    "in sync all-reduce", "inside", "START_DP_WAVE acted/ignored"):
            table.add_column(col)
        for row in recorder.latest:
            if not row.get("reachable"):
                table.add_row(str(row["rank"]), "[red]unreachable[/red]", *["-"] * 6)
                continue
            phase_style = {"running": "green", "pending_pause": "yellow",
                           "paused": "cyan"}[row["phase"]]
            inside = (f"{row['inside']} {row['inside_seconds']:.1f}s" if row["inside"] else "-")
            table.add_row(str(row["rank"]), f"[{phase_style}]{row['phase']}[/{phase_style}]",
                          str(row["wave"]), f"{row['steps_real']}/{row['steps_dummy']}",
                          str(row["sync_rounds"]), f"{row['sync_inside_seconds']:.1f}s", inside,
                          f"{row['start_dp_wave']['acted']}/{row['start_dp_wave']['ignored']}")
        steps = "  ".join(f"[bold]{s}[/bold]" if s == story.current else s for s in Story.STEPS)
        return Group(Text.from_markup(steps), table,
                     Text("\n".join(story.lines[-6:])),
                     Text("metrics: " + "  ".join(u or "-" for u in urls), style="dim"))

    return render


def plan_run(options: DemoOptions) -> Plan:
    """Seed, fault rank and expected verdict, decided before the engine exists."""
    seed = options.seed if options.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    fault_rank = options.fault_rank if options.fault_rank is not None else rng.randrange(
        options.ranks)
    out_dir = Path(options.out)
    return Plan(options, seed, rng, fault_rank, out_dir, _expected(options, fault_rank))


def run_story(make_engine: Callable[[Plan], DemoEngine], options: DemoOptions,
              out: Callable[[str], None] = print,
              err: Callable[[str], None] = lambda line: print(line, file=sys.stderr)) -> int:
    """Tell the story on the engine ``make_engine`` builds; the demo's exit status.

    0: the run ended as the story expected; 1: another verdict, or the engine failed (one
    line on ``err``); 128 + signal number: stopped by a signal. However it ends, the engine's
    processes are stopped and ``summary.json`` and ``report.html`` hold what the run had."""
    plan = plan_run(options)
    if not 0 <= plan.fault_rank < options.ranks:
        out(f"{PROG}: error: --fault-rank {plan.fault_rank} is not a rank of a "
            f"{options.ranks}-rank cluster: use 0..{options.ranks - 1}")
        return 2
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    for stale in (SUMMARY, SPANS, REPORT):
        (plan.out_dir / stale).unlink(missing_ok=True)
    for dump in (plan.out_dir / FLIGHT_DIR).glob("flight-rank*.json"):
        dump.unlink()  # an earlier run's hang dumps
    engine = make_engine(plan)  # validates settings and ports: errors before anything starts
    state = StoryState()
    recorder = live = None
    final_rows: list[dict] = []
    story = Story(None, lambda text: None)
    started = time.time()
    stopped: Stopped | None = None
    failure: str | None = None
    watchdog = None
    with stop_signals() as signals:
        try:
            watchdog = TreeWatchdog()  # a demo killed without a word takes its tree with it
            out(engine.describe())
            engine.start(out)
            for rank, url in enumerate(engine.metrics_urls):
                out(f"rank {rank} metrics: {url}")
            recorder = Recorder(engine.metrics_urls, plan.out_dir).start()
            if options.live:
                from rich.console import Console
                from rich.live import Live

                story = Story(recorder, lambda text: None)
                render = _live_view(recorder, story, engine.metrics_urls)
                live = Live(render(), console=Console(), refresh_per_second=4)
                recorder.on_sample(lambda rows: live.update(render()))
                live.start()
            else:
                story = Story(recorder,
                              lambda text: out(f"[{time.time() - started:6.1f}s] {text}"))
            budget = 120.0 + options.duration * 3 + options.hold + engine.fault_deadline
            engine.run(_story(engine, plan, story, state), budget)
        except Stopped as e:
            stopped = e
        except KeyboardInterrupt:
            stopped = Stopped(2)
        except Exception as e:  # noqa: BLE001 - an engine's failure is one line, not a traceback
            failure = f"{type(e).__name__}: {e}"
        finally:
            signals.clean_up()  # from here on a signal is remembered, never raised
            stopped = stopped or signals.raised
            try:
                if stopped is not None:
                    story.note(f"stopped by {stopped}: stopping every engine process")
                elif failure is not None:
                    story.note(f"the story failed: {failure}")
                if live is not None:
                    live.stop()
                if recorder is not None:
                    final_rows = recorder.finish()
            finally:
                engine.close()
                if watchdog is not None:
                    watchdog.stop()
        stopped = stopped or signals.raised
        code = finish_run(plan.out_dir, options, state.verdict, plan.expected, out,
                          urls=engine.metrics_urls, final_rows=final_rows, started=started,
                          seed=plan.seed, pauses=state.pauses,
                          fault_rank=(plan.fault_rank
                                      if options.fault not in ("none", *GROUP_FAULTS)
                                      and options.protocol != "legacy" else None),
                          stopped_by=str(stopped) if stopped else None, failure=failure,
                          **engine.summary_fields())
    if stopped is not None:
        err(f"{PROG}: stopped by {stopped}; every engine process is down; what the run had is "
            f"in {plan.out_dir}")
        return stopped.exit_code
    if failure is not None:
        err(f"{PROG}: error: the story failed ({failure}); every engine process is down; what "
            f"the run had is in {plan.out_dir}")
        return 1
    return code


async def _diagnose(targets: list[str], story: Story, deadline: float, want_fault: bool = True,
                    expected: tuple[str, list[int]] | None = None) -> Any:
    """:func:`diagnose_until`, off the event loop (requests keep flowing while it reads)."""
    return await asyncio.to_thread(diagnose_until, targets, story, deadline, want_fault,
                                   expected)


async def _story(engine: DemoEngine, plan: Plan, story: Story, state: StoryState) -> None:
    options = plan.options
    targets = [_target_of(u) for u in engine.metrics_urls]
    await engine.warm_up()
    phase = max(1.0, options.duration * 0.25)
    traffic = engine.traffic(plan.rng)
    try:
        story.step("traffic", f"traffic for {phase:.0f} s")
        traffic.enabled = True
        await asyncio.sleep(phase)
        traffic.enabled = False
        state.pauses += 1
        try:
            await staggered_barrier(engine.client(), routed_rank=1 % options.ranks,
                                    first_wait=engine.first_wait, gap=engine.gap,
                                    narrator=story)
        except (CollectiveHang, ScenarioHang) as hang:
            story.note(f"HANG caught: {hang}")
            state.verdict = await _diagnose(targets, story, 15.0, expected=plan.expected)
            await _verdict_and_hold(story, state, options)
            return
        story.step("more traffic", f"more traffic for {phase:.0f} s")
        traffic.enabled = True
        await asyncio.sleep(phase)
        if options.fault == "none":
            state.verdict = await _diagnose(targets, story, 1.0, want_fault=False)
            await _verdict_and_hold(story, state, options)
        else:
            recover = await engine.inject(story, state, traffic)
            state.verdict = await _diagnose(targets, story, engine.fault_deadline,
                                            expected=plan.expected)
            await _verdict_and_hold(story, state, options)
            await recover()
        reasons = await traffic.finish()
        if reasons is not None:
            lost = [r for r in reasons if r != "completed"]
            story.note(f"traffic: {len(reasons)} requests finished"
                       + (f", {len(lost)} not completed: {lost}" if lost else ", all completed"))
    finally:
        traffic.cancel()


async def _verdict_and_hold(story: Story, state: StoryState, options: DemoOptions) -> None:
    story.step("verdict", f"verdict: {state.verdict.kind}: {state.verdict.summary}")
    if options.hold > 0:
        story.note(f"holding the engine for {options.hold:.0f} s (Ctrl-C to stop)")
        await asyncio.sleep(options.hold)


# ----------------------------------------------------------------------------------------------
# the CPU cluster's adapter
# ----------------------------------------------------------------------------------------------


class ClusterTraffic:
    """Background requests at random ranks while enabled (a thread: the cluster's calls
    block); nothing waits for them at the end."""

    def __init__(self, cluster: Cluster, rng: random.Random) -> None:
        self.cluster, self.rng = cluster, rng
        self.enabled = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02 if self.enabled else 0.1):
            if self.enabled:
                try:
                    self.cluster.generate(self.rng.randint(5, 60))
                except (ClusterError, ValueError, OSError):
                    return  # the cluster is stopping
                self._stop.wait(self.rng.uniform(0.01, 0.04))

    async def finish(self) -> list[str] | None:
        self.cancel()
        return None

    def cancel(self) -> None:
        self._stop.set()
        self.enabled = False
        self._thread.join(2)


@dataclass
class ClusterEngine:
    """:class:`DemoEngine` over the CPU reference cluster."""

    plan: Plan
    first_wait: float = 0.5
    gap: float = 1.0
    cluster: Cluster = field(init=False)
    fault_deadline: float = field(init=False)

    def __post_init__(self) -> None:
        o = self.plan.options
        telemetry = TelemetryConfig.from_env(metrics_port_base=o.metrics_port_base,
                                             spans_file=str(self.plan.out_dir / SPANS),
                                             debug_endpoint=o.debug_endpoint or None,
                                             flight_dir=str(self.plan.out_dir / FLIGHT_DIR))
        if telemetry.watchdog_seconds is None:  # the story's hang must dump before it ends
            telemetry = replace(telemetry, watchdog_seconds=DEMO_WATCHDOG_SECONDS)
        # --hosts: the lab's names and addresses are planned now, built by start()
        self.lab = Lab(o.hosts) if o.hosts else None
        config = ClusterConfig(ranks=o.ranks, protocol=o.protocol, cadence=o.cadence,
                               sync_interval=o.sync_interval, hang_timeout=6.0,
                               telemetry=telemetry,
                               # peers of a stalled rank must keep waiting through --hold
                               collective_timeout=120.0 + o.duration + o.hold,
                               hosts=self.lab.rank_hosts(o.ranks) if self.lab else ())
        self.cluster = Cluster(config)  # checks settings and ports
        self.fault_deadline = max(15.0, o.duration * 0.5)
        self._loop = asyncio.new_event_loop()
        self._home: int | None = None  # the namespace the demo left for the monitor's

    @property
    def metrics_urls(self) -> list[str]:
        return [u or "" for u in self.cluster.metrics_urls]

    def describe(self) -> str:
        o = self.plan.options
        where = (f" over {len(self.lab.hosts)} hosts (network namespaces on one bridge)"
                 if self.lab else "")
        return (f"starting a {o.ranks}-rank CPU cluster{where} ({o.protocol}, sync every "
                f"{o.sync_interval} steps, {o.cadence} cadence, seed {self.plan.seed})")

    def start(self, out: Callable[[str], None]) -> None:
        if self.lab is None:
            self.cluster.start()
            return
        self.lab.build(who=f"`{PROG} demo --hosts`")
        self.cluster.start()  # each rank joins its host's namespace before any socket
        # the demo itself reads the ranks as the monitor host does (the live view, the
        # doctor, the final expositions): its main thread, and what it starts, from here on
        self._home = enter_netns(self.lab.monitor)
        for line in self.reach_lines():
            out(line)

    def reach_lines(self) -> list[str]:
        """Where each rank runs and how to reach its endpoint while the demo runs (only from
        the monitor namespace: the lab's addresses exist nowhere else)."""
        if self.lab is None:
            return []
        urls = self.metrics_urls
        lines = [f"lab: {len(self.lab.hosts)} hosts on a bridge, monitor "
                 f"{self.lab.monitor_address} (netns {self.lab.monitor}); the namespaces are "
                 "removed when the demo ends"]
        for host in self.hosts():
            lines.append(f"host {host['host']}: {host['address']} (netns {host['netns']}): "
                         + ("rank " if len(host["ranks"]) == 1 else "ranks ")
                         + ", ".join(str(r) for r in host["ranks"]))
        targets = ",".join(_target_of(u) for u in urls if u)
        lines.append(f"reach a rank's endpoint: ip netns exec {self.lab.monitor} curl -s "
                     f"{urls[0] if urls else 'URL'}")
        lines.append(f"ask the doctor: ip netns exec {self.lab.monitor} {PROG} doctor "
                     f"--targets {targets}")
        return lines

    def hosts(self) -> list[dict[str, Any]]:
        """The lab's hosts (number from 1, address, namespace) and the ranks on each."""
        if self.lab is None:
            return []
        placed = self.cluster.config.hosts
        return [{"host": h.index + 1, "address": h.address, "netns": h.netns,
                 "ranks": [r for r, rh in enumerate(placed) if rh.netns == h.netns]}
                for h in self.lab.hosts]

    def run(self, story: Coroutine[Any, Any, None], budget: float) -> None:
        from instrumented_core.scenarios import bounded

        self._loop.run_until_complete(bounded(story, budget, "the story"))

    def client(self) -> PauseClient:
        return ClusterClient(self.cluster)

    async def warm_up(self) -> None:
        pass  # a CPU rank routes a request sent while paused like any other

    def traffic(self, rng: random.Random) -> DemoTraffic:
        return ClusterTraffic(self.cluster, rng)

    async def inject(self, story: Story, state: StoryState,
                     traffic: DemoTraffic) -> Callable[[], Awaitable[None]]:
        fault, rank = self.plan.options.fault, self.plan.fault_rank
        if fault in GROUP_FAULTS:
            story.step("fault", f"injecting '{fault}' on every rank")
            await asyncio.to_thread(self.cluster.inject_fault, None, fault)
        else:
            story.step("fault", f"injecting '{fault}' on rank {rank}")
            await asyncio.to_thread(self.cluster.inject_fault, rank, fault)

        async def nothing() -> None:
            pass  # the cluster stops with the fault in place
        return nothing

    def close(self) -> None:
        try:
            if self._home is not None:  # back from the monitor's namespace first: removing
                home, self._home = self._home, None  # it kills what is still inside
                leave_netns(home)
            _cancel_tasks(self._loop)
        finally:
            try:
                self.cluster.stop()
            finally:
                if self.lab is not None:
                    self.lab.close()

    def summary_fields(self) -> dict[str, Any]:
        return {"hosts": self.hosts()} if self.lab is not None else {}


def _target_of(url: str) -> str:
    """``host:port`` of a metrics URL (what ``doctor --targets`` takes)."""
    return url.removeprefix("http://").removesuffix("/metrics")


def _cancel_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what a stopped story left on ``loop`` and let the cancellations run (its
    ``finally`` blocks stop the traffic), then close the loop."""
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.wait(tasks, timeout=5))
    loop.close()


def run_demo(options: DemoOptions, out: Callable[[str], None] = print) -> int:
    """The story on the CPU cluster; the exit status (see :func:`run_story`)."""
    return run_story(ClusterEngine, options, out)


def finish_run(out_dir: Path, options: DemoOptions, verdict: Any,
               expected: tuple[str, list[int]], out: Callable[[str], None], *, urls: list,
               final_rows: list[dict], started: float, seed: int, pauses: int,
               fault_rank: int | None, **extra: Any) -> int:
    """Write summary.json and report.html, print the verdict; the demo's exit status.

    Shared by every engine so their outputs cannot drift apart. Without a verdict (the run
    was stopped or failed first) the summary says ``no_verdict`` and the status is 1."""
    expected_kind, expected_culprits = expected
    verdict_fields = verdict.as_dict() if verdict is not None else {
        "verdict": "no_verdict", "culprit_ranks": [], "victim_ranks": [],
        "summary": "the run ended before a verdict"
                   + (f" (stopped by {extra['stopped_by']})" if extra.get("stopped_by")
                      else f" ({extra['failure']})" if extra.get("failure") else ""),
        "details": {}}
    summary = {
        **{k: v for k, v in extra.items() if v is not None},
        "protocol": options.protocol,
        "cadence": options.cadence,
        "ranks": options.ranks,
        "sync_interval": options.sync_interval,
        "seed": seed,
        "fault": options.fault,
        "fault_rank": fault_rank,
        "pauses": pauses,
        "sync_rounds": [row.get("sync_rounds") for row in final_rows],
        "start_dp_wave": {o: sum(row.get("start_dp_wave", {}).get(o, 0) for row in final_rows)
                          for o in ("acted", "ignored", "stale", "excluded")},
        **verdict_fields,
        "expected": {"verdict": expected_kind, "culprit_ranks": expected_culprits},
        "metrics_urls": urls,
        "duration_seconds": round(time.time() - started, 2),
        "options": asdict(options),
    }
    (out_dir / SUMMARY).write_text(json.dumps(summary, indent=2))
    from instrumented_core.report import build_report

    report = build_report(out_dir)
    out(f"verdict: {verdict_fields['verdict']}: {verdict_fields['summary']}")
    if verdict_fields["culprit_ranks"]:
        out("culprit ranks: " + ", ".join(str(r) for r in verdict_fields["culprit_ranks"]))
    out("metrics were served at: " + "  ".join(u or "-" for u in urls))
    out(f"report: {report}  summary: {out_dir / SUMMARY}  spans: {out_dir / SPANS}")
    if verdict is None:
        return 1
    if not verdict_matches(verdict.kind, verdict.culprits, expected_kind, expected_culprits):
        out(f"{PROG}: error: expected {expected_kind} "
            f"{expected_culprits or ''} but the metrics say {verdict.kind} {verdict.culprits}")
        return 1
    return 0


def diagnose_until(targets: list[str], story: Story, deadline: float, want_fault: bool = True,
                   expected: tuple[str, list[int]] | None = None, what: str = "ranks"):
    """Doctor's verdict from the ranks' metrics; with a fault, wait until it names someone.
    Both demos use it (the vLLM demo from a thread, off its event loop).

    With ``expected``, keep reading until the doctor says that (or the deadline passes): a
    fault takes up to the doctor's threshold to show as what it is (a worker that just
    stopped is not yet named until its peers have waited 2 s). Every other verdict seen on
    the way is noted in the story, so the log shows how the verdict formed."""
    end = time.monotonic() + deadline
    seen = None
    while True:
        report = run_doctor(targets=targets)
        verdict = report.verdict
        settled = not want_fault or (
            not verdict.healthy if expected is None
            else verdict_matches(verdict.kind, verdict.culprits, *expected))
        if settled or time.monotonic() > end:
            story.note(f"doctor: {verdict.kind}: {verdict.summary} "
                       f"({report.elapsed:.2f} s to read {len(targets)} {what})")
            return verdict
        if not verdict.healthy and (verdict.kind, verdict.culprits) != seen:
            seen = (verdict.kind, verdict.culprits)
            story.note(f"doctor (not settled yet): {verdict.kind}: {verdict.summary}")
        time.sleep(0.5)


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty() and shutil.get_terminal_size().columns > 0
