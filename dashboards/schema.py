"""What ``--check`` verifies beyond staleness: every query names known series, and the
JSON survives a round trip through the SDK's dashboard model plus the structural rules the
model cannot express."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as dm

from dashboards.panels import DATASOURCE
from instrumented_core.telemetry import names as n

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
