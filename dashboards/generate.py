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
import sys
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as dm

from dashboards.panels import DASHBOARDS, OUT_DIR
from dashboards.schema import _queries, _schema_errors, series_names
from instrumented_core.telemetry import names as n

__all__ = ["DASHBOARDS", "OUT_DIR", "build_all", "check", "expanded_queries", "main", "render"]


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
