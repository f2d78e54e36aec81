"""Render the ops bundle for one configuration: the files ``instrumented-core ops export`` writes.

The templates are package data (``instrumented_core/ops/bundle``), so a wheel install has
everything a checkout has. Rule and runbook templates are rendered as text, which keeps their
comments; dashboards are JSON whose string leaves are templates. The checkout's
``otel-config/`` and ``dashboards/*.json`` are this export at the defaults (``python -m
dashboards.generate --check`` fails when they drift).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import resources
from typing import Any

from instrumented_core.ops import kubernetes, mixin
from instrumented_core.ops.config import DEFAULTS, DESCRIPTIONS, render, thresholds_are_default

__all__ = ["ALERT_FILES", "DASHBOARDS", "RULE_FILES", "RULE_TESTS", "bundle_files", "dashboard_templates", "render_leaves",
           "rule_templates", "threshold_table"]

RULE_FILES = ("recording.yml", "alerts.yml", "reachability.yml")
# promtool unit tests, written for the default thresholds (left out of a configured export)
RULE_TESTS = ("alerts_test.yml", "reachability_test.yml")
# alert rule files: the mixin's prometheusAlerts and the PrometheusRule carry all of them
ALERT_FILES = ("alerts.yml", "reachability.yml")
DASHBOARDS = ("dp_pause_consensus.json", "stuck_rank.json")
STATIC = ("alertmanager.yml", "collector.yaml")


def _bundle_text(*parts: str) -> str:
    return resources.files("instrumented_core.ops").joinpath("bundle", *parts).read_text()


def render_leaves(data: Any, config: Mapping[str, Any]) -> Any:
    """``data`` with every string rendered (keys are never templates)."""
    if isinstance(data, str):
        return render(data, config)
    if isinstance(data, list):
        return [render_leaves(v, config) for v in data]
    if isinstance(data, dict):
        return {k: render_leaves(v, config) for k, v in data.items()}
    return data


def rule_templates() -> dict[str, Any]:
    """File name -> the rule file's template, parsed (string leaves are templates)."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return {name: yaml.load(_bundle_text("rules", name), Loader=loader) for name in RULE_FILES}


def dashboard_templates() -> dict[str, Any]:
    return {name: json.loads(_bundle_text("dashboards", name)) for name in DASHBOARDS}


def dump_json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def threshold_table(config: Mapping[str, Any]) -> str:
    """The configuration as a markdown table (runbooks.md and docs/ops.md show it)."""
    rows = ["| Option | Value | Meaning |", "| --- | --- | --- |"]
    for key in DEFAULTS:
        value = str(config[key]).replace("|", "\\|")
        rows.append(f"| `{key}` | `{value}` | {DESCRIPTIONS[key]} |")
    return "\n".join(rows)


def _context(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config plus values derived from it for the Python-only templates."""
    targets = "\n".join(f"          - 127.0.0.1:{config['metricsPortBase'] + r}  # rank {r}"
                        for r in range(config["dpSize"]))
    return {**config, "staticTargets": targets,
            "thresholdTable": threshold_table(config).replace("%", "%%") % {}}


def bundle_files(config: Mapping[str, Any]) -> dict[str, str]:
    """Relative path -> text of every exported file."""
    ctx = _context(config)
    out: dict[str, str] = {}
    for name in RULE_FILES:
        out[f"rules/{name}"] = render(_bundle_text("rules", name), ctx)
    if thresholds_are_default(config):
        for name in RULE_TESTS:
            out[f"rules/{name}"] = render(_bundle_text("rules", name), ctx)
    for name, template in dashboard_templates().items():
        out[f"dashboards/{name}"] = dump_json(render_leaves(template, config))
    out["runbooks.md"] = render(_bundle_text("runbooks.md"), ctx)
    for name in ("prometheus.yml", "prometheus-multihost.yml"):
        out[name] = render(_bundle_text(name), ctx)
    for name in STATIC:
        out[name] = _bundle_text(name)
    out["mixin/mixin.libsonnet"] = mixin.libsonnet(config, rule_templates(), dashboard_templates())
    out.update(kubernetes.manifests(config, out))
    out["ops-config.json"] = dump_json(dict(config))
    return out
