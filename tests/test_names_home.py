"""Every metric, span, event and attribute name lives in ``telemetry/names.py`` (README: "What
the telemetry says"): no code or test outside it spells one as a literal, so renaming a series
is one edit and a typo cannot pass as a name nobody emits. Docstrings and messages may mention
names inside longer text; a literal that *is* a name (or its exposed ``_total``, ``_info``,
``_count``, ``_sum``, ``_bucket`` form) is what this test refuses.
"""

from __future__ import annotations

import ast
from pathlib import Path

from instrumented_core.telemetry import names as n

ROOT = Path(__file__).resolve().parent.parent
SUFFIXES = ("", "_total", "_info", "_count", "_sum", "_bucket")


def _names() -> set[str]:
    out = set()
    for key, value in vars(n).items():
        if not key.isupper() or not isinstance(value, str) or value in (n.INFO, n.PREFIX):
            continue  # a prefix is no name; n.INFO's bare "vllm_dp" is an entry point's too
        if value.startswith(n.PREFIX):
            out |= {value + suffix for suffix in SUFFIXES}
        elif value.startswith(("dp.", "vllm.dp.")):
            out.add(value)
    out.add(n.INFO + "_info")
    return out


def _docstrings(tree: ast.AST) -> set[int]:
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, kinds) and node.body and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)}


def test_no_name_is_spelled_outside_names_py():
    names = _names()
    home = ROOT / "instrumented_core" / "telemetry" / "names.py"
    found = []
    for folder in ("instrumented_core", "tests", "benchmarks", "dashboards"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == home:
                continue
            tree = ast.parse(path.read_text(), str(path))
            docs = _docstrings(tree)
            for node in ast.walk(tree):
                if not isinstance(node, ast.Constant) or id(node) in docs:
                    continue
                value = node.value
                if isinstance(value, bytes):
                    value = value.decode("utf-8", "replace")
                if isinstance(value, str) and value in names:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {value!r}")
    assert not found, "use the constant from telemetry/names.py:\n  " + "\n  ".join(found)
