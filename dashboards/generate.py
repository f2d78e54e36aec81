"""Generate the Grafana dashboards of the vLLM DP two-phase pause into committed JSON.

    python -m dashboards.generate           # write dashboards/*.json
    python -m dashboards.generate --check   # fail if the JSON is stale or a query is wrong

Built with grafana-foundation-sdk (the Grafana 11.6 models, a dev dependency). ``--check``
fails when:

- the committed JSON differs from what this program generates;
- a panel query names a ``vllm_dp_*`` series that ``telemetry.names.exposed_series_names()``
  does not define;
- the JSON does not survive a round trip through the SDK's dashboard model (the Go/TS schema
  of Grafana's dashboards, generated into Python): ``Dashboard.from_json`` then ``to_json``
  must give back exactly the same document, so every key is a schema field and every panel's
  ``options``/``fieldConfig.defaults.custom`` decode through that panel type's own model;
  plus structural rules the model cannot express (enum values, unique ids and refIds, grid
  layout, every query on the ``$datasource`` variable, no hard-coded datasource UID).

``expanded_queries()`` returns every panel query with the dashboard variables filled in, for
tests that run them against a real Prometheus.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus as pb
from grafana_foundation_sdk.builders import stat, statetimeline, text, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm

from instrumented_core.telemetry import names as n

__all__ = ["DASHBOARDS", "OUT_DIR", "build_all", "check", "expanded_queries", "main", "render"]

OUT_DIR = Path(__file__).resolve().parent
RUNBOOKS = "https://github.com/instrumented-core/instrumented-core/blob/main/otel-config/runbooks.md"

DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
# Label selectors, spelled once: the whole DP group, and the ranks picked in `engine`.
GROUP = f'{n.LABEL_MODEL_NAME}="$model_name"'
RANKS = f'{GROUP}, {n.LABEL_ENGINE}=~"$engine"'
SYNC = f'{n.LABEL_COLLECTIVE}="{n.COLLECTIVE_SYNC}"'
STEP = f'{n.LABEL_COLLECTIVE}="{n.COLLECTIVE_STEP}"'
RATE = "$__rate_interval"
STUCK_SECONDS = 10  # as in otel-config/rules (peers inside the sync all-reduce longer than this)
WEDGED_SECONDS = 10  # as in otel-config/rules (VllmDpGroupWedged / VllmDpRankWedged thresholds)

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
            .query(f"label_values({n.PHASE}, {n.LABEL_MODEL_NAME})")
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

# Seconds since the rank last progressed, for a rank that has not progressed for 10 s and is
# not inside the sync all-reduce while at least one peer has been inside it for 10 s: the
# VllmDpSyncAllReduceStuck signature, restricted to the selected model.
CULPRIT = (
    f"(timestamp({n.LAST_PROGRESS}{{{GROUP}}}) - {n.LAST_PROGRESS}{{{GROUP}}} > {STUCK_SECONDS})"
    f" unless on (job, {n.LABEL_MODEL_NAME}, {n.LABEL_ENGINE})"
    f" ({n.COLLECTIVE_INSIDE}{{{GROUP}, {SYNC}}} > 0)"
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
           q(f"sum by ({n.LABEL_ENGINE}) (rate({n.SYNC_ROUNDS}_total{{{RANKS}}}[{RATE}]))",
             "engine {{engine}}"),
           w=8)
    )
    d = d.with_panel(
        ts("Sync round skew (max - min over ranks)",
           "Completed rounds of the most advanced rank minus the least advanced. While running "
           "this includes scrape-offset noise (rounds/s x the scrape time difference); a gap "
           "that stays while the group is paused or idle is real (alert VllmDpSyncRoundSkew).",
           "none",
           q(f"max({n.SYNC_ROUNDS}_total{{{GROUP}}}) - min({n.SYNC_ROUNDS}_total{{{GROUP}}})",
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
           "while no rounds run).", "s",
           q(f"histogram_quantile(0.5, sum by (le) (rate({n.SYNC_WAIT}_bucket{{{RANKS}}}[{RATE}]))) "
             f"and on () (sum(rate({n.SYNC_WAIT}_count{{{RANKS}}}[{RATE}])) > 0)", "p50", "A"),
           q(f"histogram_quantile(0.99, sum by (le) (rate({n.SYNC_WAIT}_bucket{{{RANKS}}}[{RATE}]))) "
             f"and on () (sum(rate({n.SYNC_WAIT}_count{{{RANKS}}}[{RATE}])) > 0)", "p99", "B"),
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
    for unit, hist, what in (("s", n.PAUSE_CONSENSUS_LATENCY, "seconds"),
                             ("none", n.PAUSE_CONSENSUS_STEPS, "steps")):
        count = f"sum(rate({hist}_count{{{RANKS}}}[{RATE}])) > 0"
        d = d.with_panel(
            ts(f"Pause request -> consensus ({what}, p50 / p99)",
               f"From a rank's pause request to all-rank consensus, in {what}. Empty when no "
               "pause reached consensus in the window.", unit,
               q(f"histogram_quantile(0.5, sum by (le) (rate({hist}_bucket{{{RANKS}}}[{RATE}]))) "
                 f"and on () ({count})", "p50", "A"),
               q(f"histogram_quantile(0.99, sum by (le) (rate({hist}_bucket{{{RANKS}}}[{RATE}]))) "
                 f"and on () ({count})", "p99", "B"),
               w=8)
        )
    d = d.with_panel(
        ts("Dummy steps per pause",
           "Mean steps a rank takes between its pause request and consensus (the dummy steps "
           "the two-phase pause costs; at most about one sync interval when all ranks request "
           "together), and dummy steps per second per rank.", "none",
           q(f"sum(rate({n.PAUSE_CONSENSUS_STEPS}_sum{{{RANKS}}}[{RATE}])) / "
             f"(sum(rate({n.PAUSE_CONSENSUS_STEPS}_count{{{RANKS}}}[{RATE}])) > 0)",
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
        ts("Seconds inside a model collective per rank (longest worker)",
           "How long the rank's workers have been inside the current DP/EP collective of the "
           "forward (MoE dispatch / combine, DP batch coordination), the longest of its "
           "workers; 0 when none is inside. Peers climbing while one rank stays at 0 inside "
           "a step: that rank never reached the collective (the culprit).", "s",
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
    return d


DASHBOARDS = {
    "dp_pause_consensus.json": pause_consensus,
    "stuck_rank.json": stuck_rank,
}


# --- output ------------------------------------------------------------------------------------


def _number_panels(model: dm.Dashboard) -> None:
    for i, panel in enumerate(model.panels or [], start=1):
        panel.id_val = i


def build_all() -> dict[str, dict[str, Any]]:
    """File name -> dashboard JSON (as plain data)."""
    out = {}
    for name, make in DASHBOARDS.items():
        model = make().build()
        _number_panels(model)
        out[name] = json.loads(json.dumps(model, cls=JSONEncoder))
    return out


def render(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


# --- checks ------------------------------------------------------------------------------------

_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def series_names(expr: str) -> set[str]:
    """``vllm_dp_*`` series names an expression reads (strings and label matchers removed)."""
    bare = _BRACES.sub(" ", _STRING.sub('""', expr))
    return {tok for tok in _IDENT.findall(bare) if tok.startswith(n.PREFIX)}


def _panels(data: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in data.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def _queries(data: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in _panels(data):
        for target in panel.get("targets", []):
            yield panel.get("title", ""), target.get("expr", "")
    for var in data.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var.get("query")
            yield f"variable {var['name']}", query if isinstance(query, str) else query.get("query", "")


def _schema_errors(name: str, data: dict[str, Any]) -> list[str]:
    from grafana_foundation_sdk.cog.plugins import register_default_plugins

    register_default_plugins()
    errors = []
    again = json.loads(json.dumps(dm.Dashboard.from_json(data), cls=JSONEncoder))
    if again != data:
        errors.append(f"{name}: does not round-trip through the Grafana 11.6 dashboard model "
                      f"(unknown or mistyped fields): {_first_diff(data, again)}")
    errors.extend(f"{name}: {e}" for e in _type_errors(dm.Dashboard.from_json(data), "$"))
    ids, cells = set(), set()
    for panel in _panels(data):
        title = panel.get("title", "?")
        if cogruntime_panel(panel["type"]) is None and panel["type"] != "row":
            errors.append(f"{name}: panel {title!r}: unknown panel type {panel['type']!r}")
        if panel.get("id") in ids:
            errors.append(f"{name}: duplicate panel id {panel.get('id')}")
        ids.add(panel.get("id"))
        pos = panel.get("gridPos", {})
        x, y, w, h = (pos.get(k, -1) for k in ("x", "y", "w", "h"))
        if not all(type(v) is int for v in (x, y, w, h)):
            continue  # reported by the type check
        if not (0 <= x and w > 0 and h > 0 and x + w <= 24 and y >= 0):
            errors.append(f"{name}: panel {title!r}: gridPos {pos} outside the 24-column grid")
        for cx in range(x, x + w):
            for cy in range(y, y + h):
                if (cx, cy) in cells:
                    errors.append(f"{name}: panel {title!r} overlaps another panel")
                    break
                cells.add((cx, cy))
            else:
                continue
            break
        refs = [t.get("refId") for t in panel.get("targets", [])]
        if len(refs) != len(set(refs)):
            errors.append(f"{name}: panel {title!r}: duplicate refId")
        for target in panel.get("targets", []):
            if target.get("datasource") != DATASOURCE.to_json():
                errors.append(f"{name}: panel {title!r}: query not on the $datasource variable")
        if panel.get("type") not in ("row", "text") and panel.get("datasource") != DATASOURCE.to_json():
            errors.append(f"{name}: panel {title!r}: datasource is not the $datasource variable")
    names = {v["name"] for v in data["templating"]["list"]}
    for needed in ("datasource", n.LABEL_MODEL_NAME, n.LABEL_ENGINE):
        if needed not in names:
            errors.append(f"{name}: missing variable {needed!r}")
    for uid in re.findall(r'"uid":\s*"([^"]*)"', json.dumps(data)):
        if uid not in ("${datasource}", data.get("uid")):
            errors.append(f"{name}: hard-coded uid {uid!r}")
    return errors


def _type_errors(value: Any, path: str, hint: Any = None) -> list[str]:
    """Check a decoded SDK model against its own type annotations, recursively.

    ``from_json`` copies scalars as they come, so a string where the schema wants an int, or
    a value outside an enum, survives the round trip; this walks the annotations instead.
    """
    import enum
    import types
    import typing

    if hint is None:
        hint = type(value)
    origin = typing.get_origin(hint)
    if hint in (typing.Any, object) or isinstance(hint, typing.TypeVar):
        # panel options / custom field config: decoded into the panel type's own model
        if type(value).__module__.startswith("grafana_foundation_sdk.models"):
            return _type_errors(value, path, type(value))
        return []
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return []
        results = [_type_errors(value, path, h) for h in options if h is not type(None)]
        return [] if any(not r for r in results) else min(results, key=len)
    if origin is typing.Literal:
        ok = value in typing.get_args(hint)
        return [] if ok else [f"{path}: {value!r} not one of {typing.get_args(hint)}"]
    if origin is list:
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {value!r}"]
        (item,) = typing.get_args(hint) or (typing.Any,)
        return [e for i, v in enumerate(value) for e in _type_errors(v, f"{path}[{i}]", item)]
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{path}: expected an object, got {value!r}"]
        _, item = typing.get_args(hint) or (str, typing.Any)
        return [e for k, v in value.items() for e in _type_errors(v, f"{path}.{k}", item)]
    if not isinstance(hint, type):
        return []
    if issubclass(hint, enum.Enum):
        ok = isinstance(value, hint) or value in {m.value for m in hint}
        return [] if ok else [f"{path}: {value!r} is not a {hint.__name__}"]
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return [] if ok else [f"{path}: expected a number, got {value!r}"]
    if hint in (int, str, bool):
        ok = isinstance(value, hint) and (hint is bool or not isinstance(value, bool))
        return [] if ok else [f"{path}: expected {hint.__name__}, got {value!r}"]
    if isinstance(value, dict) and hasattr(hint, "from_json"):
        value = hint.from_json(value)  # the SDK leaves some nested models (panel links) raw
    if not isinstance(value, hint):
        return [f"{path}: expected {hint.__name__}, got {value!r}"]
    if not hint.__module__.startswith("grafana_foundation_sdk.models"):
        return []
    errors = []
    for attr, attr_hint in typing.get_type_hints(hint).items():
        if hasattr(value, attr):
            errors.extend(_type_errors(getattr(value, attr), f"{path}.{attr}", attr_hint))
    return errors


def cogruntime_panel(panel_type: str):
    from grafana_foundation_sdk.cog import runtime

    return runtime.panelcfg_config(panel_type)


def _first_diff(a: Any, b: Any, path: str = "$") -> str:
    if type(a) is not type(b):
        return f"{path}: {a!r} != {b!r}"
    if isinstance(a, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                return f"{path}.{key}: only in {'original' if key in a else 'round trip'}"
            if a[key] != b[key]:
                return _first_diff(a[key], b[key], f"{path}.{key}")
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_diff(x, y, f"{path}[{i}]")
    return f"{path}: {a!r} != {b!r}"


def check(out_dir: Path = OUT_DIR) -> list[str]:
    """Every problem with the committed dashboards; empty when they are up to date and valid."""
    errors = []
    known = n.exposed_series_names()
    for name, data in build_all().items():
        path = out_dir / name
        if not path.exists():
            errors.append(f"{path}: missing; run python -m dashboards.generate")
            committed = None
        else:
            committed = json.loads(path.read_text())
            if path.read_text() != render(data):
                errors.append(f"{path}: differs from the generated output; "
                              "run python -m dashboards.generate")
        for doc in [data] + ([committed] if committed is not None else []):
            for title, expr in _queries(doc):
                for series in sorted(series_names(expr) - known):
                    errors.append(f"{name}: {title!r} queries {series}, which "
                                  "instrumented_core.telemetry.names does not define")
            errors.extend(_schema_errors(name, doc))
    return sorted(set(errors))


def expanded_queries(model_name: str, engine: str = ".*", rate_interval: str = "1m",
                     range_: str = "5m") -> dict[str, list[tuple[str, str]]]:
    """File name -> [(panel title, PromQL with the dashboard variables filled in)]."""
    values = {"$model_name": model_name, "$engine": engine, "$__rate_interval": rate_interval,
              "$__range": range_}
    out = {}
    for name, data in build_all().items():
        rows = []
        for title, expr in _queries(data):
            if title.startswith("variable "):
                continue
            for var in sorted(values, key=len, reverse=True):
                expr = expr.replace(var, values[var])
            rows.append((title, expr))
        out[name] = rows
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dashboards.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="fail if the committed JSON is stale or invalid; write nothing")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output directory")
    args = parser.parse_args(argv)
    if args.check:
        errors = check(args.out)
        for error in errors:
            print(error, file=sys.stderr)
        if not errors:
            print(f"dashboards up to date and valid: {', '.join(DASHBOARDS)}")
        return 1 if errors else 0
    for name, data in build_all().items():
        (args.out / name).write_text(render(data))
        print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
