"""Kubernetes manifests for kube-prometheus-stack: PodMonitor, PrometheusRule, dashboard ConfigMaps.

- ``PodMonitor``: one ``podMetricsEndpoints`` entry per DP rank, on the named container port
  ``ic-rank-<r>`` (rank r serves on ``metricsPortBase + r``), each relabelled to the
  configured ``job`` so the rules' selector matches in-cluster as it does with prometheus.yml.
  A pod that does not declare a rank's port is not scraped for it (no false ``up == 0``).
- ``PrometheusRule``: the recording and alert groups (alerts.yml, reachability.yml) exactly as
  exported in ``rules/``.
- ``vllm-deployment.example.yaml``: a vLLM Deployment with the plugin's environment and the
  named ports the PodMonitor scrapes (an example to adapt, not applied as is).
- Dashboard ``ConfigMap``s labelled ``grafana_dashboard: "1"`` (what the Grafana sidecar of
  kube-prometheus-stack watches), with the folder in the sidecar's ``grafana_folder``
  annotation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["PART_OF", "container_ports", "manifests", "port_name", "vllm_deployment"]

PART_OF = {"app.kubernetes.io/part-of": "instrumented-core"}


def port_name(rank: int) -> str:
    """The container port name of a rank's /metrics (an IANA service name: at most 15 chars)."""
    return f"ic-rank-{rank}"


def container_ports(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ``ports`` entries a vLLM container declares for its ranks' /metrics."""
    return [{"name": port_name(r), "containerPort": config["metricsPortBase"] + r,
             "protocol": "TCP"} for r in range(config["dpSize"])]


def _yaml(docs: list[dict[str, Any]]) -> str:
    """YAML documents; multi-line strings (dashboards, rule expressions) as block scalars."""
    import yaml

    class Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # type: ignore[misc]
        pass  # libyaml's dumper where the yaml build has it: 10x faster on the dashboards

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    return "---\n".join(yaml.dump(d, Dumper=Dumper, sort_keys=False, width=1000) for d in docs)


def vllm_deployment(config: Mapping[str, Any]) -> dict[str, Any]:
    """An example vLLM Deployment (one pod, DP = dpSize) with the plugin's environment and one
    named metrics port per rank, matching the PodMonitor. The image must have vLLM and
    instrumented-core installed (the plugin loads through vLLM's entry points)."""
    from instrumented_core.ops.config import pod_labels

    env = [
        # bind each rank's /metrics on the pod IP (the default is loopback: unreachable)
        {"name": "INSTRUMENTED_CORE_METRICS_HOST",
         "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "INSTRUMENTED_CORE_METRICS_PORT_BASE", "value": str(config["metricsPortBase"])},
        # spans to an OpenTelemetry Collector (collector.yaml, listening on the pod network)
        {"name": "OTEL_TRACES_EXPORTER", "value": "otlp"},
        {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://otel-collector:4318"},
        {"name": "OTEL_EXPORTER_OTLP_PROTOCOL", "value": "http/protobuf"},
    ]
    container = {
        "name": "vllm",
        "image": "registry.example.com/vllm-with-instrumented-core:0.32.0",
        "command": ["vllm", "serve", "/models/model", "--served-model-name", "my-model",
                 "--data-parallel-size", str(config["dpSize"]), "--enable-expert-parallel",
                 "--host", "0.0.0.0", "--port", "8000"],
        "env": env,
        "ports": [{"name": "http", "containerPort": 8000, "protocol": "TCP"},
                  *container_ports(config)],
        "resources": {"limits": {"nvidia.com/gpu": config["dpSize"]}},
    }
    labels = pod_labels(config)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "vllm", "namespace": config["namespace"], "labels": dict(labels)},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": dict(labels)},
            "template": {"metadata": {"labels": dict(labels)},
                         "spec": {"containers": [container]}},
        },
    }


def pod_monitor(config: Mapping[str, Any]) -> dict[str, Any]:
    from instrumented_core.ops.config import pod_labels

    endpoints = [{
        "port": port_name(r),
        "path": "/metrics",
        "interval": config["scrapeInterval"],
        "relabelings": [{"action": "replace", "targetLabel": "job",
                         "replacement": config["job"]}],
    } for r in range(config["dpSize"])]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": "vllm-dp-pause", "namespace": config["namespace"],
                     "labels": dict(PART_OF)},
        "spec": {"selector": {"matchLabels": pod_labels(config)},
                 "podMetricsEndpoints": endpoints},
    }


def prometheus_rule(config: Mapping[str, Any], groups: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "vllm-dp-pause", "namespace": config["namespace"],
                     "labels": dict(PART_OF)},
        "spec": {"groups": groups},
    }


def dashboard_config_map(config: Mapping[str, Any], name: str, text: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "vllm-dp-dashboard-" + name.removesuffix(".json").replace("_", "-"),
            "namespace": config["namespace"],
            "labels": {"grafana_dashboard": "1", **PART_OF},
            "annotations": {"grafana_folder": config["grafanaFolder"]},
        },
        "data": {name: text},
    }


def manifests(config: Mapping[str, Any], files: Mapping[str, str]) -> dict[str, str]:
    """Relative path -> manifest text, built from the already rendered ``files``."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    groups = [g for name in ("rules/recording.yml", "rules/alerts.yml", "rules/reachability.yml")
              for g in yaml.load(files[name], Loader=loader)["groups"]]
    maps = [dashboard_config_map(config, path.split("/", 1)[1], text)
            for path, text in sorted(files.items()) if path.startswith("dashboards/")]
    return {
        "kubernetes/podmonitor.yaml": _yaml([pod_monitor(config)]),
        "kubernetes/prometheusrule.yaml": _yaml([prometheus_rule(config, groups)]),
        "kubernetes/grafana-dashboards.yaml": _yaml(maps),
        "kubernetes/vllm-deployment.example.yaml": _yaml([vllm_deployment(config)]),
    }
