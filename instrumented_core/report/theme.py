"""The report's look: colours, geometry, and HTML escaping."""

from __future__ import annotations

import html

STATES = ("running", "pending_pause", "paused", "unreachable")
STATE_COLORS = {"running": "#4caf50", "pending_pause": "#ffb300", "paused": "#42a5f5",
                "unreachable": "#e53935"}
OUTCOME_COLORS = {"acted": "#43a047", "ignored": "#fb8c00", "stale": "#9e9e9e",
                  "excluded": "#8e24aa"}
RANK_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
               "#7f7f7f", "#bcbd22", "#17becf")
VERDICT_COLORS = {"healthy": "#2e7d32", "pausing": "#1565c0", "paused": "#1565c0",
                  "slow": "#ef6c00", "stuck": "#c62828", "deadlock": "#6a1b9a",
                  "wedged": "#4e342e"}
HEALTHY_VERDICTS = ("healthy", "pausing", "paused")

WIDTH = 1240
LEFT = 90
RIGHT = 30
EVENT_LABEL_ROWS = 3
TOP = 14 + 11 * EVENT_LABEL_ROWS  # room above a time plot for its event numbers
INSIDE_MIN_SECONDS = 0.5  # a rank shown "inside" a collective once it waited this long
COLLECTIVE_COLORS = ("#263238", "#6a1b9a", "#00838f", "#ad1457", "#5d4037")


def esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def rank_color(rank: int) -> str:
    return RANK_COLORS[rank % len(RANK_COLORS)]
