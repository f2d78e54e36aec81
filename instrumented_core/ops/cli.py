"""``instrumented-core ops export``: write the ops bundle for one configuration."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from instrumented_core.ops.config import DEFAULTS, OpsConfigError, load_config

__all__ = ["add_parser", "run"]

PROG = "instrumented-core"

EPILOG = """options for --set (default in brackets):
""" + "\n".join(f"  {key} [{value}]" for key, value in DEFAULTS.items()) + """

The promtool unit tests (rules/alerts_test.yml, rules/reachability_test.yml) are written for the default thresholds and a
job selector; an export with other thresholds or another selector leaves them out."""


def _assignment(raw: str) -> tuple[str, str]:
    key, sep, value = raw.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set takes KEY=VALUE, got {raw!r}")
    return key.strip(), value


def add_parser(sub: Any) -> None:
    """The ``ops`` command and its ``export`` subcommand, on the main parser's subparsers."""
    ops = sub.add_parser("ops", help="write the ops bundle: rules, dashboards, runbooks, "
                                     "Kubernetes manifests, mixin")
    ops_sub = ops.add_subparsers(dest="ops_command", required=True, parser_class=type(ops))
    export = ops_sub.add_parser(
        "export", help="render the bundle for a configuration into a directory",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("--out", type=Path, required=True, help="output directory (created)")
    export.add_argument("--config", type=Path, default=None,
                        help="JSON or YAML file of options (the keys listed below)")
    export.add_argument("--job", default=None, help="Prometheus job of the ranks' targets "
                                                    f"(default {DEFAULTS['job']})")
    export.add_argument("--selector", default=None,
                        help="label matchers on every rule and dashboard query "
                             "(default job=\"<job>\")")
    export.add_argument("--runbook-url-base", default=None,
                        help="where you publish runbooks.md; links are BASE#<alert> "
                             f"(default {DEFAULTS['runbookUrlBase']}, the exported file)")
    export.add_argument("--namespace", default=None, help="Kubernetes namespace")
    export.add_argument("--dp-size", default=None, help="DP ranks per pod (one scrape port each)")
    export.add_argument("--set", dest="assignments", action="append", default=[],
                        type=_assignment, metavar="KEY=VALUE",
                        help="any option below, e.g. --set syncStuckSeconds=20; repeatable")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = dict(args.assignments)
    for flag, key in (("job", "job"), ("selector", "selector"),
                      ("runbook_url_base", "runbookUrlBase"), ("namespace", "namespace"),
                      ("dp_size", "dpSize")):
        if getattr(args, flag) is not None:
            values[key] = getattr(args, flag)
    return values


def _write(out: Path, files: dict[str, str]) -> None:
    if out.exists() and not out.is_dir():
        raise OpsConfigError(f"--out {out} is a file: give a directory")
    for rel, text in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for name in ("alerts_test.yml", "reachability_test.yml"):
        stale = out / "rules" / name
        if f"rules/{name}" not in files and stale.exists():
            stale.unlink()  # an earlier export's tests, written for other thresholds


def run(args: argparse.Namespace) -> int:
    from instrumented_core.ops.render import bundle_files

    try:
        config = load_config(args.config, _overrides(args))
        files = bundle_files(config)
        _write(args.out, files)
    except OpsConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        where = e.filename or args.out
        print(f"{PROG}: error: cannot write {where}: {e.strerror or e}; pass a writable "
              "--out directory", file=sys.stderr)
        return 2
    print(f"wrote {len(files)} files to {os.fspath(args.out)}:")
    for rel in sorted(files):
        print(f"  {rel}")
    if "rules/alerts_test.yml" not in files:
        print("rules/reachability_test.yml and rules/alerts_test.yml left out: the promtool unit "
              "tests are written for the "
              "default thresholds and a job selector")
    return 0
