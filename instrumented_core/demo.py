"""``instrumented-core demo``: a scripted story on a live cluster, watched through its metrics.

Story: traffic; pause(keep) -> barrier on engine 0 -> request routed to engine 1 -> barrier on
the others -> resume (vLLM's ``test_dp_pause_barrier_request_deadlock``); more traffic; then
the injected fault on one rank. The verdict comes from the ranks' own ``/metrics`` through the
doctor's logic, so the demo proves what an operator would see.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from instrumented_core.cluster import Cluster, ClusterConfig, CollectiveHang
from instrumented_core.cluster.scenarios import staggered_barrier_with_request
from instrumented_core.diagnosis import verdict_matches
from instrumented_core.doctor import run_doctor
from instrumented_core.recorder import Recorder
from instrumented_core.run_files import FLIGHT_DIR, REPORT, SPANS, SUMMARY
from instrumented_core.telemetry import TelemetryConfig


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


class Traffic:
    """Background requests at random ranks while enabled; every handle is kept."""

    def __init__(self, cluster: Cluster, rng: random.Random) -> None:
        self.cluster, self.rng = cluster, rng
        self.handles = []
        self.enabled = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.enabled.wait(0.1) and not self._stop.is_set():
                try:
                    self.handles.append(self.cluster.generate(self.rng.randint(5, 60)))
                except Exception:  # noqa: BLE001 - the cluster is stopping
                    return
                time.sleep(self.rng.uniform(0.01, 0.04))

    def stop(self) -> None:
        self._stop.set()
        self.enabled.clear()
        self._thread.join(2)


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


def run_demo(options: DemoOptions, out=print) -> int:
    """Run the story; returns the exit status (0 when the run ended as the story expected)."""
    rng = random.Random(options.seed)
    seed = options.seed if options.seed is not None else random.randrange(1 << 30)
    rng.seed(seed)
    fault_rank = options.fault_rank if options.fault_rank is not None else rng.randrange(
        options.ranks)
    if not 0 <= fault_rank < options.ranks:
        out(f"instrumented-core: error: --fault-rank {fault_rank} is not a rank of a "
            f"{options.ranks}-rank cluster: use 0..{options.ranks - 1}")
        return 2
    out_dir = Path(options.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in (SUMMARY, SPANS, REPORT):
        (out_dir / stale).unlink(missing_ok=True)
    for dump in (out_dir / FLIGHT_DIR).glob("flight-rank*.json"):
        dump.unlink()  # an earlier run's hang dumps
    telemetry = TelemetryConfig.from_env(metrics_port_base=options.metrics_port_base,
                                         spans_file=str(out_dir / SPANS),
                                         debug_endpoint=options.debug_endpoint or None,
                                         flight_dir=str(out_dir / FLIGHT_DIR))
    if telemetry.watchdog_seconds is None:  # the story's hang must dump before it ends
        telemetry = replace(telemetry, watchdog_seconds=DEMO_WATCHDOG_SECONDS)
    config = ClusterConfig(ranks=options.ranks, protocol=options.protocol,
                           cadence=options.cadence, sync_interval=options.sync_interval,
                           hang_timeout=6.0, telemetry=telemetry,
                           # peers of a stalled rank must keep waiting through --hold
                           collective_timeout=120.0 + options.duration + options.hold)
    cluster = Cluster(config)  # validates settings and ports: errors before anything starts
    expected_kind, expected_culprits = _expected(options, fault_rank)
    recorder = live = traffic = None
    story = Story(None, lambda text: None)
    pauses = 0
    started = time.time()
    verdict = None
    try:
        out(f"starting a {options.ranks}-rank CPU cluster ({options.protocol}, sync every "
            f"{options.sync_interval} steps, {options.cadence} cadence, seed {seed})")
        cluster.start()
        for rank, url in enumerate(cluster.metrics_urls):
            out(f"rank {rank} metrics: {url}")
        recorder = Recorder(cluster.metrics_urls, out_dir).start()
        if options.live:
            from rich.console import Console
            from rich.live import Live

            story = Story(recorder, lambda text: None)
            render = _live_view(recorder, story, cluster.metrics_urls)
            live = Live(render(), console=Console(), refresh_per_second=4)
            recorder.on_sample(lambda rows: live.update(render()))
            live.start()
        else:
            story = Story(recorder, lambda text: out(f"[{time.time() - started:6.1f}s] {text}"))
        phase = max(1.0, options.duration * 0.25)
        traffic = Traffic(cluster, rng)

        story.step("traffic", f"traffic for {phase:.0f} s")
        traffic.enabled.set()
        time.sleep(phase)
        traffic.enabled.clear()

        story.step("pause(keep)", "pause_generation(mode='keep') on all ranks")
        cluster.pause("keep")
        pauses += 1
        story.note("all ranks paused (consensus reached)" if options.protocol == "two-phase"
                   else "all ranks paused (each rank locally)")
        try:
            story.step("staggered barrier + routed request",
                       "barrier on engine 0; request routed to engine 1; barrier on the others")
            routed = staggered_barrier_with_request(cluster, routed_rank=1 % options.ranks,
                                                    first_wait=0.5, second_wait=1.0)
            story.step("barrier + resume", "barrier on all engines, then resume")
            cluster.barrier()
            cluster.resume()
            story.note(f"routed request {routed.result(10)}")
        except CollectiveHang as hang:
            story.note(f"HANG caught: {hang}")
            verdict = diagnose_until(_targets(cluster), story, deadline=10.0)
        if verdict is None:
            story.step("more traffic", f"more traffic for {phase:.0f} s")
            traffic.enabled.set()
            time.sleep(phase)
            if options.fault in GROUP_FAULTS:
                story.step("fault", f"injecting '{options.fault}' on every rank")
                cluster.inject_fault(None, options.fault)
            elif options.fault != "none":
                story.step("fault", f"injecting '{options.fault}' on rank {fault_rank}")
                cluster.inject_fault(fault_rank, options.fault)
            verdict = diagnose_until(_targets(cluster), story,
                                     deadline=max(15.0, options.duration * 0.5),
                                     want_fault=options.fault != "none",
                                     expected=(expected_kind, expected_culprits))
        story.step("verdict", f"verdict: {verdict.kind}: {verdict.summary}")
        if options.hold > 0:
            story.note(f"holding the cluster for {options.hold:.0f} s (Ctrl-C to stop)")
            time.sleep(options.hold)
    finally:
        if traffic is not None:
            traffic.stop()
        final_rows = recorder.finish() if recorder is not None else []
        if live is not None:
            live.stop()
        cluster.stop()

    return finish_run(out_dir, options, verdict, (expected_kind, expected_culprits), out,
                      urls=cluster.metrics_urls, final_rows=final_rows, started=started,
                      seed=seed, pauses=pauses,
                      fault_rank=(fault_rank if options.fault not in ("none", *GROUP_FAULTS)
                                  else None))


def finish_run(out_dir: Path, options: DemoOptions, verdict, expected: tuple[str, list[int]],
               out, *, urls: list, final_rows: list[dict], started: float, seed: int,
               pauses: int, fault_rank: int | None, **extra) -> int:
    """Write summary.json and report.html, print the verdict; the demo's exit status.

    Shared by both engines (CPU cluster, real vLLM) so their outputs cannot drift apart."""
    expected_kind, expected_culprits = expected
    summary = {
        **extra,
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
        **verdict.as_dict(),
        "expected": {"verdict": expected_kind, "culprit_ranks": expected_culprits},
        "metrics_urls": urls,
        "duration_seconds": round(time.time() - started, 2),
        "options": asdict(options),
    }
    (out_dir / SUMMARY).write_text(json.dumps(summary, indent=2))
    from instrumented_core.report import build_report

    report = build_report(out_dir)
    out(f"verdict: {verdict.kind}: {verdict.summary}")
    if verdict.culprits:
        out("culprit ranks: " + ", ".join(str(r) for r in verdict.culprits))
    out("metrics were served at: " + "  ".join(u or "-" for u in urls))
    out(f"report: {report}  summary: {out_dir / SUMMARY}  spans: {out_dir / SPANS}")
    if not verdict_matches(verdict.kind, verdict.culprits, expected_kind, expected_culprits):
        out(f"instrumented-core: error: expected {expected_kind} "
            f"{expected_culprits or ''} but the metrics say {verdict.kind} {verdict.culprits}")
        return 1
    return 0


def _targets(cluster: Cluster) -> list[str]:
    return [u for u in cluster.metrics_urls if u]


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
