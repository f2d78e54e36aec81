"""The dashboards themselves: panels, queries and variables (grafana-foundation-sdk 11.6
builders), from the names module and the ops configuration.

Configured values (thresholds, the selector, the runbook base) are written as ``cfg(key)``
sentinels; ``generate.py`` turns them into ``%(key)s`` templates shipped in the package, which
the export (and the mixin) fill from ``instrumented_core.ops.config``."""

from __future__ import annotations

from pathlib import Path

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus as pb
from grafana_foundation_sdk.builders import stat, statetimeline, text, timeseries
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm

from instrumented_core.ops.config import DEFAULTS
from instrumented_core.telemetry import names as n

OUT_DIR = Path(__file__).resolve().parent


def cfg(key: str) -> str:
    """A configured value, filled in when the template is rendered (see generate.py)."""
    assert key in DEFAULTS, key
    return f"@@{key}@@"


RUNBOOKS = cfg("runbookUrlBase")

DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
# Label selectors, spelled once: the whole DP group, and the ranks picked in `engine`.
SELECTOR = cfg("selector")
GROUP = f'{SELECTOR}, {n.LABEL_MODEL_NAME}="$model_name"'
RANKS = f'{GROUP}, {n.LABEL_ENGINE}=~"$engine"'
SYNC = f'{n.LABEL_COLLECTIVE}="{n.COLLECTIVE_SYNC}"'
STEP = f'{n.LABEL_COLLECTIVE}="{n.COLLECTIVE_STEP}"'
RATE = "$__rate_interval"
STUCK_SECONDS = cfg("syncStuckSeconds")  # peers inside the sync all-reduce longer than this
WEDGED_SECONDS = cfg("wedgedSeconds")  # VllmDpGroupWedged / VllmDpRankWedged thresholds

PHASE_COLORS = {n.PHASE_RUNNING: "green", n.PHASE_PENDING_PAUSE: "yellow", n.PHASE_PAUSED: "blue"}


# --- small helpers ---------------------------------------------------------------------------


def q(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> pb.Dataquery:
    query = pb.Dataquery().expr(expr).ref_id(ref).datasource(DATASOURCE)
    if legend:
        query = query.legend_format(legend)
    return query.instant() if instant else query.range()


def phase_mappings() -> list[dm.ValueMap]:
    by_code = {code: name for name, code in n.PHASE_CODES.items()}
    return [
        dm.ValueMap(options={
            str(code): dm.ValueMappingResult(text=by_code[code], color=PHASE_COLORS[code],
                                             index=code)
            for code in sorted(by_code)
        })
    ]


def legend_table() -> cb.VizLegendOptions:
    return (cb.VizLegendOptions().show_legend(True).display_mode(cm.LegendDisplayMode.TABLE)
            .placement(cm.LegendPlacement.RIGHT).calcs(["lastNotNull", "max"]))


def runbook_link(alert: str) -> db.DashboardLink:
    return (db.DashboardLink(f"Runbook: {alert}").url(f"{RUNBOOKS}#{alert.lower()}")
            .target_blank(True))


def ts(title: str, description: str, unit: str, *queries: pb.Dataquery,
       w: int = 12, h: int = 8) -> timeseries.Panel:
    panel = (timeseries.Panel().title(title).description(description).datasource(DATASOURCE)
             .unit(unit).span(w).height(h).legend(legend_table()).fill_opacity(10))
    for query in queries:
        panel = panel.with_target(query)
    return panel


def variables(d: db.Dashboard) -> db.Dashboard:
    return (
        d.with_variable(db.DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(
            db.QueryVariable(n.LABEL_MODEL_NAME).label("Model").datasource(DATASOURCE)
            .query(f"label_values({n.PHASE}{{{SELECTOR}}}, {n.LABEL_MODEL_NAME})")
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(dm.VariableSort.ALPHABETICAL_ASC)
        )
        .with_variable(
            db.QueryVariable(n.LABEL_ENGINE).label("DP rank (engine)").datasource(DATASOURCE)
            .query(f"label_values({n.PHASE}{{{GROUP}}}, {n.LABEL_ENGINE})")
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dm.VariableSort.NUMERICAL_ASC).multi(True).include_all(True)
        )
    )


def base(title: str, uid: str, description: str) -> db.Dashboard:
    d = (db.Dashboard(title).uid(uid).description(description)
         .tags(["vllm", "data-parallel", "instrumented-core"])
         .time("now-30m", "now").refresh("10s").timezone("browser")
         .tooltip(dm.DashboardCursorSync.CROSSHAIR).readonly()
         .link(db.DashboardLink("vLLM DP dashboards").type(dm.DashboardLinkType.DASHBOARDS)
               .tags(["instrumented-core"]).as_dropdown(True).include_vars(True)
               .keep_time(True))
         .link(db.DashboardLink("Runbooks").url(RUNBOOKS).target_blank(True)))
    return variables(d)


# --- the culprit query, shared by the stuck-rank panels ----------------------------------------

# Seconds since the rank last progressed, for a rank that has not progressed for 10 s, is
# not inside the sync all-reduce and has no worker waiting in a model collective (a peer that
# left the round first waits there: a victim) while at least one peer has been inside the
# round for 10 s: the
# VllmDpSyncAllReduceStuck signature, restricted to the selected model.
CULPRIT = (
    f"(timestamp({n.LAST_PROGRESS}{{{GROUP}}}) - {n.LAST_PROGRESS}{{{GROUP}}} > {STUCK_SECONDS})"
    f" unless on (job, {n.LABEL_MODEL_NAME}, {n.LABEL_ENGINE})"
    f" ({n.COLLECTIVE_INSIDE}{{{GROUP}, {SYNC}}} > 0)"
    f" unless on (job, {n.LABEL_MODEL_NAME}, {n.LABEL_ENGINE})"
    f" (max without ({n.LABEL_WORKER}) ({n.WORKER_MODEL_COLLECTIVE_INSIDE}{{{GROUP}}}) > 0)"
    f" and on (job, {n.LABEL_MODEL_NAME})"
    f" (count by (job, {n.LABEL_MODEL_NAME}) ({n.COLLECTIVE_INSIDE}{{{GROUP}, {SYNC}}} > {STUCK_SECONDS}))"
)


# --- dashboards --------------------------------------------------------------------------------


def pause_consensus() -> db.Dashboard:
    d = base(
        "vLLM DP / Pause consensus",
        "vllm-dp-pause-consensus",
        "Two-phase pause of vLLM data-parallel ranks: per-rank phase, sync_dp_state rounds, "
        "pause-request-to-consensus latency and START_DP_WAVE handling.",
    )
    d = d.with_row(db.Row("Phase"))
    d = d.with_panel(
        statetimeline.Panel().title("Pause phase per rank")
        .description("0 running, 1 pending_pause (voting in each sync round), 2 paused "
                     "(consensus reached). Every rank should move together.")
        .datasource(DATASOURCE).span(16).height(8).mappings(phase_mappings())
        .show_value(cm.VisibilityMode.AUTO).merge_values(True).fill_opacity(70).line_width(0).row_height(0.8)
        .with_target(q(f"max by ({n.LABEL_ENGINE}) ({n.PHASE}{{{RANKS}}})", "engine {{engine}}"))
    )
    d = d.with_panel(
        ts("Ranks pending / paused vs dp_size",
           "Ranks in pending_pause and paused, against the group's dp_size. Consensus is "
           "reached when the pending ranks equal dp_size in one sync round.", "none",
           q(f"sum({n.PHASE}{{{GROUP}}} == bool {n.PHASE_PENDING_PAUSE})", "pending_pause", "A"),
           q(f"sum({n.PHASE}{{{GROUP}}} == bool {n.PHASE_PAUSED})", "paused", "B"),
           q(f"max({n.DP_SIZE}{{{GROUP}}})", "dp_size", "C"),
           w=8)
    )
    d = d.with_row(db.Row("Sync rounds"))
    d = d.with_panel(
        ts("Sync rounds per second per rank",
           "Completed sync_dp_state all-reduce rounds per second (every sync_interval steps "
           "and on step 1 of a wave). Lockstep ranks draw the same line.", "ops",
           q(f"sum by ({n.LABEL_ENGINE}) (rate({n.SYNC_WAIT_COUNT}{{{RANKS}}}[{RATE}]))",
             "engine {{engine}}"),
           w=8)
    )
    d = d.with_panel(
        ts("Sync round skew (max - min over ranks)",
           "Completed rounds of the most advanced rank minus the least advanced. While running "
           "this includes scrape-offset noise (rounds/s x the scrape time difference); a gap "
           "that stays while the group is paused or idle is real (alert VllmDpSyncRoundSkew).",
           "none",
           q(f"max({n.SYNC_WAIT_COUNT}{{{GROUP}}}) - min({n.SYNC_WAIT_COUNT}{{{GROUP}}})",
             "max - min"),
           w=8)
    )
    d = d.with_panel(
        ts("Seconds inside the sync all-reduce per rank",
           "How long each rank has been inside the current sync_dp_state all-reduce (0 when "
           "not inside). Healthy rounds take milliseconds; peers growing while one rank stays "
           "at 0 is the stuck-rank signature.", "s",
           q(f"max by ({n.LABEL_ENGINE}) ({n.COLLECTIVE_INSIDE}{{{RANKS}, {SYNC}}})",
             "engine {{engine}}"),
           w=8)
    )
    d = d.with_panel(
        ts("Sync all-reduce wait (p50 / p99)",
           "Time spent inside each sync_dp_state all-reduce, over the selected ranks (empty "
           "while no rounds run). Exemplars (dots) link a round of a pause to its trace.", "s",
           q(f"histogram_quantile(0.5, sum by (le) (rate({n.SYNC_WAIT}_bucket{{{RANKS}}}[{RATE}]))) "
             f"and on () (sum(rate({n.SYNC_WAIT}_count{{{RANKS}}}[{RATE}])) > 0)", "p50", "A"),
           q(f"histogram_quantile(0.99, sum by (le) (rate({n.SYNC_WAIT}_bucket{{{RANKS}}}[{RATE}]))) "
             f"and on () (sum(rate({n.SYNC_WAIT}_count{{{RANKS}}}[{RATE}])) > 0)", "p99",
             "B").exemplar(True),
           w=8)
    )
    d = d.with_panel(
        ts("Time since last progress per rank",
           "Seconds since each rank last completed a step, sync round or utility call. Idle "
           "and paused groups stop progressing everywhere; one rank growing while its peers "
           "stay near 0 is not.", "s",
           q(f"time() - max by ({n.LABEL_ENGINE}) ({n.LAST_PROGRESS}{{{RANKS}}})",
             "engine {{engine}}"),
           w=8)
    )
    d = d.with_row(db.Row("Pause consensus"))
    hist = n.PAUSE_CONSENSUS_LATENCY
    count = f"sum(rate({hist}_count{{{RANKS}}}[{RATE}])) > 0"
    d = d.with_panel(
        ts("Pause request -> consensus (seconds, p50 / p99)",
           "From a rank's pause request to all-rank consensus, in seconds. Empty when no "
           "pause reached consensus in the window. Exemplars (dots) link a pause to its "
           "trace.", "s",
           q(f"histogram_quantile(0.5, sum by (le) (rate({hist}_bucket{{{RANKS}}}[{RATE}]))) "
             f"and on () ({count})", "p50", "A"),
           q(f"histogram_quantile(0.99, sum by (le) (rate({hist}_bucket{{{RANKS}}}[{RATE}]))) "
             f"and on () ({count})", "p99", "B").exemplar(True),
           w=8)
    )
    # steps summed over pauses, over the pauses the latency histogram counted
    steps, pauses = n.PAUSE_CONSENSUS_STEPS_TOTAL, n.PAUSE_CONSENSUS_LATENCY_COUNT
    d = d.with_panel(
        ts("Pause request -> consensus (steps, mean per rank)",
           "From a rank's pause request to all-rank consensus, in steps, averaged over the "
           "pauses in the window (at most about one sync interval when all ranks request "
           "together). Empty when no pause reached consensus in the window.", "none",
           q(f"sum by ({n.LABEL_ENGINE}) (rate({steps}{{{RANKS}}}[{RATE}])) / "
             f"(sum by ({n.LABEL_ENGINE}) (rate({pauses}{{{RANKS}}}[{RATE}])) > 0)",
             "engine {{engine}}", "A"),
           w=8)
    )
    d = d.with_panel(
        ts("Dummy steps per pause",
           "Mean steps a rank takes between its pause request and consensus (the dummy steps "
           "the two-phase pause costs; at most about one sync interval when all ranks request "
           "together), and dummy steps per second per rank.", "none",
           q(f"sum(rate({steps}{{{RANKS}}}[{RATE}])) / "
             f"(sum(rate({pauses}{{{RANKS}}}[{RATE}])) > 0)",
             "steps per pause", "A"),
           q(f"sum by ({n.LABEL_ENGINE}) (rate({n.STEPS}_total{{{RANKS}, {n.LABEL_KIND}=\"dummy\"}}[{RATE}]))",
             "dummy steps/s engine {{engine}}", "B"),
           w=8)
    )
    d = d.with_panel(
        ts("START_DP_WAVE by outcome",
           "START_DP_WAVE messages per second: acted (woke or advanced the rank), ignored "
           "(dropped while paused: the two-phase fix at work), stale, excluded. Acted while "
           "paused is vLLM #36594.", "ops",
           q(f"sum by ({n.LABEL_OUTCOME}) (rate({n.START_DP_WAVE}_total{{{RANKS}}}[{RATE}]))",
             "{{outcome}}"),
           w=12)
    )
    d = d.with_panel(
        ts("Pause requests and resumes",
           "Pause requests by mode, consensus reached and resumes, per second.", "ops",
           q(f"sum by ({n.LABEL_MODE}) (rate({n.PAUSE_REQUESTS}_total{{{RANKS}}}[{RATE}]))",
             "pause {{mode}}", "A"),
           q(f"sum(rate({n.PAUSE_CONSENSUS}_total{{{RANKS}}}[{RATE}]))", "consensus", "B"),
           q(f"sum(rate({n.RESUMES}_total{{{RANKS}}}[{RATE}]))", "resume", "C"),
           w=12)
    )
    return d


def stuck_rank() -> db.Dashboard:
    d = base(
        "vLLM DP / Stuck rank",
        "vllm-dp-stuck-rank",
        "Which DP rank holds the group up: the rank that is not in the sync all-reduce while "
        "its peers wait inside it, its phase, and the waiting peers; inside the forward step, "
        "the rank whose workers are frozen or never reach the model collective.",
    )
    d = d.with_panel(
        text.Panel().title("How to read this").span(24).height(4).mode("markdown")
        .content(
            "A rank that stops before the periodic `sync_dp_state` all-reduce leaves its peers "
            f"waiting inside it; after {STUCK_SECONDS} s the **culprit** below is the rank that is "
            "*not* inside it and not progressing. Confirm with "
            "`instrumented-core doctor --targets host:port,...`. Inside the forward step "
            "(bottom row): with requests in flight, the wedged rank sits in `step` while its "
            "workers are *not* in a model collective (or have no heartbeat) and its peers' "
            "workers wait in one. Runbooks: "
            f"[VllmDpGroupWedged]({RUNBOOKS}#vllmdpgroupwedged), "
            f"[VllmDpRankWedged]({RUNBOOKS}#vllmdprankwedged), "
            f"[VllmDpSyncAllReduceStuck]({RUNBOOKS}#vllmdpsyncallreducestuck), "
            f"[VllmDpRankNotProgressing]({RUNBOOKS}#vllmdpranknotprogressing), "
            f"[VllmDpPauseConsensusSlow]({RUNBOOKS}#vllmdppauseconsensusslow), "
            f"[VllmDpStartDpWaveActedWhilePaused]({RUNBOOKS}#vllmdpstartdpwaveactedwhilepaused)."
        )
    )
    d = d.with_panel(
        stat.Panel().title("Culprit rank (stalled for)")
        .description("Rank not inside the sync all-reduce and not progressing while peers "
                     "wait inside it; the value is how long since it last progressed.")
        .datasource(DATASOURCE).span(8).height(5).unit("s").no_value("none")
        .text_mode(cm.BigValueTextMode.VALUE_AND_NAME).color_mode(cm.BigValueColorMode.BACKGROUND)
        .graph_mode(cm.BigValueGraphMode.NONE)
        .thresholds(db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps([
            dm.Threshold(value=None, color="red")]))
        .links([runbook_link("VllmDpSyncAllReduceStuck")])
        .with_target(q(CULPRIT, "engine {{engine}}", instant=True))
    )
    d = d.with_panel(
        stat.Panel().title("Culprit phase")
        .description("Pause phase of the culprit rank.")
        .datasource(DATASOURCE).span(8).height(5).mappings(phase_mappings()).no_value("none")
        .text_mode(cm.BigValueTextMode.VALUE_AND_NAME).graph_mode(cm.BigValueGraphMode.NONE)
        .links([runbook_link("VllmDpSyncAllReduceStuck")])
        .with_target(q(f"max by ({n.LABEL_ENGINE}) ({n.PHASE}{{{GROUP}}} and on (job, "
                       f"{n.LABEL_MODEL_NAME}, {n.LABEL_ENGINE}) ({CULPRIT}))",
                       "engine {{engine}}", instant=True))
    )
    d = d.with_panel(
        stat.Panel().title("Peers waiting in the sync all-reduce")
        .description(f"Ranks inside sync_dp_state for more than {STUCK_SECONDS} s.")
        .datasource(DATASOURCE).span(8).height(5).graph_mode(cm.BigValueGraphMode.AREA)
        .thresholds(db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps([
            dm.Threshold(value=None, color="green"), dm.Threshold(value=1, color="red")]))
        .links([runbook_link("VllmDpSyncAllReduceStuck")])
        .with_target(q(f"count({n.COLLECTIVE_INSIDE}{{{GROUP}, {SYNC}}} > {STUCK_SECONDS}) "
                       "or vector(0)", "waiting peers"))
    )
    d = d.with_panel(
        ts("Seconds inside each collective per rank",
           "Who waits where: seconds each rank has been inside each collective (0 when not "
           "inside). Victims climb; the culprit stays at 0 for sync_dp_state.", "s",
           q(f"max by ({n.LABEL_ENGINE}, {n.LABEL_COLLECTIVE}) ({n.COLLECTIVE_INSIDE}{{{RANKS}}})",
             "engine {{engine}} {{collective}}"))
    )
    d = d.with_panel(
        ts("Time since last progress per rank",
           "Seconds since each rank last completed a step, sync round or utility call.", "s",
           q(f"time() - max by ({n.LABEL_ENGINE}) ({n.LAST_PROGRESS}{{{RANKS}}})",
             "engine {{engine}}"))
    )
    d = d.with_panel(
        statetimeline.Panel().title("Pause phase per rank")
        .description("0 running, 1 pending_pause, 2 paused.")
        .datasource(DATASOURCE).span(12).height(7).mappings(phase_mappings())
        .show_value(cm.VisibilityMode.AUTO).merge_values(True).fill_opacity(70).line_width(0)
        .with_target(q(f"max by ({n.LABEL_ENGINE}) ({n.PHASE}{{{RANKS}}})", "engine {{engine}}"))
    )
    d = d.with_panel(
        ts("Steps until the next sync round per rank",
           "A rank stuck with steps left before the sync while its peers are inside it "
           "stalled inside a step; wave and step counters show where each rank is.", "none",
           q(f"max by ({n.LABEL_ENGINE}) ({n.STEPS_UNTIL_SYNC}{{{RANKS}}})",
             "until sync engine {{engine}}", "A"),
           q(f"max by ({n.LABEL_ENGINE}) ({n.STEP_COUNTER}{{{RANKS}}})",
             "wave step engine {{engine}}", "B"),
           q(f"max by ({n.LABEL_ENGINE}) ({n.CURRENT_WAVE}{{{RANKS}}})",
             "wave engine {{engine}}", "C"))
    )
    # Inside the forward step: the engine core waits for its workers; the workers' view comes
    # from the worker board (series only where vLLM workers publish them).
    d = d.with_row(db.Row("Inside the forward step"))
    d = d.with_panel(
        ts("Seconds inside step per rank",
           "How long each rank's engine core has been inside the current step, waiting for "
           "its workers' forward (real and dummy steps; 0 between steps). Healthy steps take "
           f"milliseconds to a second; over {WEDGED_SECONDS} s with requests in flight is a "
           "wedge (VllmDpRankWedged / VllmDpGroupWedged).", "s",
           q(f"max by ({n.LABEL_ENGINE}) ({n.COLLECTIVE_INSIDE}{{{RANKS}, {STEP}}})",
             "engine {{engine}}"))
        .links([runbook_link("VllmDpRankWedged")])
    )
    d = d.with_panel(
        ts("Seconds inside a model collective per rank (all its workers)",
           "How long all the rank's workers have been inside a DP/EP collective of the "
           "forward (MoE dispatch / combine, DP batch coordination), since the latest of them "
           "entered; 0 when any of them is not inside one. Peers climbing while one rank stays "
           "at 0 inside a step: that rank never reached the collective (the culprit).", "s",
           q(f"max by ({n.LABEL_ENGINE}) ({n.WORKER_MODEL_COLLECTIVE_INSIDE}{{{RANKS}}})",
             "engine {{engine}}"))
        .links([runbook_link("VllmDpRankWedged")])
    )
    d = d.with_panel(
        ts("Worker heartbeat age per rank (oldest worker)",
           "Seconds since the rank's least recent worker heartbeat (written every 0.25 s by a "
           "thread of the worker). Waiting in a collective or a kernel keeps it near 0; it grows "
           "only while the worker process is frozen (SIGSTOP, or C code holding the GIL).", "s",
           q(f"max by ({n.LABEL_ENGINE}) ({n.WORKER_HEARTBEAT_AGE}{{{RANKS}}})",
             "engine {{engine}}"))
        .links([runbook_link("VllmDpRankWedged")])
    )
    d = d.with_panel(
        ts("Requests in flight per rank (running + waiting)",
           "Requests each rank's scheduler holds: busy or idle, explicitly. No progress with "
           "requests in flight on a rank that is not paused is a wedge; no progress with none "
           "is idle; a paused rank may hold kept requests.", "none",
           q(f"sum by ({n.LABEL_ENGINE}) ({n.REQUESTS_RUNNING}{{{RANKS}}}) + "
             f"sum by ({n.LABEL_ENGINE}) ({n.REQUESTS_WAITING}{{{RANKS}}})",
             "engine {{engine}}"))
        .links([runbook_link("VllmDpGroupWedged")])
    )
    d = d.with_panel(
        ts("Plugin active per rank (1 on, 0 off: see the reason)",
           "Whether our plugin instruments each rank, and if not, why (the legend shows the "
           "reason: ok, unknown_version, or what the contract check found missing). A rank that "
           "is off shows only this series: its other panels stay empty.", "none",
           q(f"max by ({n.LABEL_ENGINE}, reason, vllm_version) "
             f"({n.PLUGIN_ACTIVE}{{{RANKS}}})",
             "engine {{engine}}: {{reason}} (vLLM {{vllm_version}})"), w=24, h=6)
    )
    # The flight recorder (issue 14): where each rank is in the DP group's collectives, and
    # the hang dumps its watchdog wrote (`instrumented-core analyze` / `doctor --bundle`).
    d = d.with_row(db.Row("Flight recorder"))
    d = d.with_panel(
        ts("DP collective sequence per rank",
           "How many DP-group collectives (sync_dp_state, resume, barrier, collective_rpc) each "
           "rank has entered. The ranks enter every one together, so the lines move as one; a "
           "rank whose line stops while the others go on (or that is ahead) has diverged: "
           "`instrumented-core doctor --bundle` names the first divergent collective.", "none",
           q(f"max by ({n.LABEL_ENGINE}) ({n.DP_COLLECTIVE_SEQ}{{{RANKS}}})",
             "engine {{engine}}"))
    )
    d = d.with_panel(
        ts("DP collective sequence skew (max - min) and hang dumps",
           "Skew: the spread of the ranks' DP collective sequence numbers (0 or 1 in a healthy "
           "group, as ranks are scraped at different instants; growing means a rank left the "
           "lockstep). Dumps: hang dumps each rank's watchdog wrote (one per incident).",
           "none",
           q(f"max({n.DP_COLLECTIVE_SEQ}{{{GROUP}}}) - min({n.DP_COLLECTIVE_SEQ}{{{GROUP}}})",
             "skew", "A"),
           q(f"max by ({n.LABEL_ENGINE}) ({n.FLIGHT_DUMPS_TOTAL}{{{RANKS}}})",
             "dumps engine {{engine}}", "B"))
    )
    return d


DASHBOARDS = {
    "dp_pause_consensus.json": pause_consensus,
    "stuck_rank.json": stuck_rank,
}
