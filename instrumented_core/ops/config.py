"""The one configuration of the ops bundle: thresholds, ``for:`` durations, selector, runbooks.

Every shipped rule, dashboard, Kubernetes manifest, the mixin's ``_config`` and the threshold
tables in the docs are rendered from :data:`DEFAULTS` (overridden by a config file and flags),
so one value changes a threshold everywhere. Templates name a value as ``%(key)s`` and write a
literal percent sign as ``%%``: the same syntax Python's ``%`` operator and jsonnet's ``%``
operator read, which is why ``mixin.libsonnet`` can apply a user's ``_config`` to the very
templates the Python export uses.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["DEFAULTS", "DESCRIPTIONS", "OpsConfigError", "load_config", "render", "thresholds_are_default"]


class OpsConfigError(ValueError):
    """A bad option or config file; the message names the problem and the fix."""


# key -> default. Keys are camelCase, as monitoring mixins spell their ``_config``.
DEFAULTS: dict[str, Any] = {
    # the Prometheus job of the ranks' scrape targets (prometheus.yml, the PodMonitor's job)
    "job": "vllm-dp",
    # label matchers every rule and dashboard query puts on the ranks' series
    "selector": 'job="vllm-dp"',
    # runbook links are <runbookUrlBase>#<alert name in lower case>; the default is the
    # runbooks.md written next to the rules: set it to where you publish that file
    "runbookUrlBase": "runbooks.md",
    # VllmDpSyncAllReduceStuck: peers inside the sync all-reduce and the culprit idle this long
    "syncStuckSeconds": 10,
    "syncStuckFor": "15s",
    # VllmDpRankNotProgressing: a rank idle this long while a peer progresses
    "notProgressingSeconds": 30,
    "notProgressingFor": "1m",
    # VllmDpPauseConsensusSlow: the pending-pause budget is clamped to [min, max] seconds
    "pauseConsensusMinSeconds": 30,
    "pauseConsensusMaxSeconds": 300,
    "pauseConsensusSlowFor": "30s",
    "syncRoundSkewFor": "2m",
    "startDpWaveFor": "30s",
    # VllmDpGroupWedged / VllmDpRankWedged: no progress, inside a step, frozen worker
    "wedgedSeconds": 10,
    "groupWedgedFor": "15s",
    "rankWedgedFor": "15s",
    # VllmDpRankWedged (c): inside collective_rpc while a peer is not
    "rpcWedgedSeconds": 30,
    # VllmDpRankUnreachable: a rank target down this long (multi-host: reachability.yml)
    "unreachableFor": "30s",
    # VllmDpPeersStalledOnUnreachableRank: peers with work idle this long while a rank is down
    "peersStalledSeconds": 10,
    "peersStalledFor": "15s",
    # Kubernetes manifests
    "namespace": "default",
    "podSelector": "app.kubernetes.io/name=vllm",
    "dpSize": 4,
    "metricsPortBase": 8100,
    "scrapeInterval": "5s",
    "grafanaFolder": "vLLM DP",
}

DESCRIPTIONS: dict[str, str] = {
    "job": "Prometheus job name of the ranks' scrape targets",
    "selector": "label matchers on every rule and dashboard query",
    "runbookUrlBase": "runbook links: <base>#<alert name in lower case>",
    "syncStuckSeconds": "peers inside the sync all-reduce (and the culprit idle) longer than this",
    "syncStuckFor": "`for:` of VllmDpSyncAllReduceStuck",
    "notProgressingSeconds": "a rank without progress this long while a peer progresses",
    "notProgressingFor": "`for:` of VllmDpRankNotProgressing",
    "pauseConsensusMinSeconds": "least time a pending pause may take before it is late",
    "pauseConsensusMaxSeconds": "most time a pending pause may take before it is late",
    "pauseConsensusSlowFor": "`for:` of VllmDpPauseConsensusSlow",
    "syncRoundSkewFor": "`for:` of VllmDpSyncRoundSkew",
    "startDpWaveFor": "`for:` of VllmDpStartDpWaveActedWhilePaused",
    "wedgedSeconds": "no progress with work in flight / inside a step / frozen worker, longer than this",
    "groupWedgedFor": "`for:` of VllmDpGroupWedged",
    "rankWedgedFor": "`for:` of VllmDpRankWedged",
    "rpcWedgedSeconds": "inside collective_rpc while a peer is not, longer than this",
    "unreachableFor": "`for:` of VllmDpRankUnreachable (a rank target down this long)",
    "peersStalledSeconds": "peers with work without progress this long while a rank is unreachable",
    "peersStalledFor": "`for:` of VllmDpPeersStalledOnUnreachableRank",
    "namespace": "namespace of the Kubernetes manifests",
    "podSelector": "label selector of the vLLM pods (key=value[,key=value])",
    "dpSize": "DP ranks per pod: the PodMonitor scrapes one port per rank",
    "metricsPortBase": "rank r serves /metrics on this port + r (INSTRUMENTED_CORE_METRICS_PORT_BASE)",
    "scrapeInterval": "scrape interval of prometheus.yml and the PodMonitor",
    "grafanaFolder": "Grafana folder annotation of the dashboard ConfigMaps",
}

THRESHOLD_KEYS = (
    "syncStuckSeconds", "syncStuckFor", "notProgressingSeconds", "notProgressingFor",
    "pauseConsensusMinSeconds", "pauseConsensusMaxSeconds", "pauseConsensusSlowFor",
    "syncRoundSkewFor", "startDpWaveFor", "wedgedSeconds", "groupWedgedFor", "rankWedgedFor",
    "rpcWedgedSeconds", "unreachableFor", "peersStalledSeconds", "peersStalledFor",
)

_DURATION = re.compile(r"(?:[1-9][0-9]*(?:ms|s|m|h))+")
_LABEL = r"[a-zA-Z_][a-zA-Z0-9_]*"
_MATCHER = rf'\s*{_LABEL}\s*(?:=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"\s*'
_SELECTOR = re.compile(rf"{_MATCHER}(?:,{_MATCHER})*")
_K8S_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_K8S_LABEL = re.compile(r"([a-zA-Z0-9.-]+/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")


def _validated(key: str, value: Any) -> Any:
    """``value`` converted to the type of the default, or an OpsConfigError naming the fix."""
    if key not in DEFAULTS:
        raise OpsConfigError(f"unknown option {key!r}: use one of {', '.join(DEFAULTS)}")
    default = DEFAULTS[key]
    if isinstance(default, int):
        try:
            number = int(str(value))
        except ValueError:
            raise OpsConfigError(f"{key}={value!r} is not a whole number: use e.g. "
                                 f"{key}={default}") from None
        low = 1 if key in ("dpSize", "metricsPortBase") or key.endswith("Seconds") else 0
        high = {"dpSize": 4096, "metricsPortBase": 65535}.get(key, 86400)
        if not low <= number <= high:
            raise OpsConfigError(f"{key}={number} is out of range: use e.g. {key}={default}")
        return number
    text = str(value)
    if key.endswith("For") or key == "scrapeInterval":
        if not _DURATION.fullmatch(text):
            raise OpsConfigError(f"{key}={text!r} is not a Prometheus duration: use e.g. "
                                 f"{key}={default}")
    elif key == "selector":
        if not _SELECTOR.fullmatch(text):
            raise OpsConfigError(f"selector={text!r} is not a list of label matchers: use e.g. "
                                 "selector='job=\"vllm-dp\",namespace=\"prod\"'")
    elif key == "job":
        if not text or any(c in text for c in "\"'\\\n{}"):
            raise OpsConfigError(f"job={text!r} is not a usable job name: use e.g. job=vllm-dp")
    elif key == "runbookUrlBase":
        if not text or any(c.isspace() or c in "\"'#<>`{}" for c in text):
            raise OpsConfigError(f"runbookUrlBase={text!r} is not a URL without spaces, quotes "
                                 "or '#': use e.g. https://wiki.example.com/vllm-dp/runbooks")
    elif key == "namespace":
        if not _K8S_NAME.fullmatch(text) or len(text) > 63:
            raise OpsConfigError(f"namespace={text!r} is not a Kubernetes namespace name: use "
                                 "lower-case letters, digits and '-'")
    elif key == "podSelector":
        _pod_labels(text)
    elif not text or "\n" in text:
        raise OpsConfigError(f"{key}={text!r} is empty or spans lines: use one line")
    return text


def _pod_labels(text: str) -> dict[str, str]:
    labels = {}
    for item in text.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep or not _K8S_LABEL.fullmatch(name) or (value and not _K8S_LABEL.fullmatch(value)):
            raise OpsConfigError(f"podSelector={text!r} is not key=value[,key=value]: use e.g. "
                                 "podSelector=app.kubernetes.io/name=vllm")
        labels[name] = value
    return labels


def pod_labels(config: Mapping[str, Any]) -> dict[str, str]:
    """The pod label selector as a mapping (``matchLabels``)."""
    return _pod_labels(str(config["podSelector"]))


def load_config(path: Path | None = None, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """DEFAULTS, then the file's values (JSON or YAML mapping), then ``overrides``.

    Setting ``job`` without ``selector`` selects that job, so ``--job`` alone is enough.
    """
    values: dict[str, Any] = {}
    if path is not None:
        try:
            text = path.read_text()
        except OSError as exc:
            raise OpsConfigError(f"cannot read config file {path}: {exc.strerror or exc}; "
                                 "pass an existing JSON or YAML file") from None
        values.update(_parse_file(path, text))
    values.update(overrides or {})
    config = dict(DEFAULTS)
    for key, value in values.items():
        config[key] = _validated(str(key), value)
    if "job" in values and "selector" not in values:
        config["selector"] = f'job="{config["job"]}"'
    if config["metricsPortBase"] + config["dpSize"] - 1 > 65535:
        raise OpsConfigError(f"metricsPortBase={config['metricsPortBase']} + dpSize="
                             f"{config['dpSize']} runs past port 65535: lower either")
    if config["pauseConsensusMinSeconds"] > config["pauseConsensusMaxSeconds"]:
        raise OpsConfigError("pauseConsensusMinSeconds is above pauseConsensusMaxSeconds: make "
                             "the minimum the smaller one")
    return config


def _parse_file(path: Path, text: str) -> dict[str, Any]:
    import yaml

    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        first = (str(exc).splitlines() or ["?"])[0]
        raise OpsConfigError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'} "
                             f"({first}): fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise OpsConfigError(f"{path} holds a {type(data).__name__}, not a mapping of options: "
                             "write key: value lines")
    if isinstance(data.get("_config"), dict):  # the mixin's own spelling
        data = data["_config"]
    return data


def render(template: str, config: Mapping[str, Any]) -> str:
    """``template`` with its ``%(key)s`` placeholders filled from ``config``."""
    return template % config


def thresholds_are_default(config: Mapping[str, Any]) -> bool:
    """The promtool unit tests are written for the default thresholds and a job selector."""
    return (all(config[k] == DEFAULTS[k] for k in THRESHOLD_KEYS)
            and config["selector"] == f'job="{config["job"]}"')
