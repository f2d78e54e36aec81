"""The ops bundle, checked with the real tools: promtool, amtool, the dashboard generator.

No server is started here (the live test against a running cluster is separate). Every test
fails, never skips, when a tool is missing: the README's test command installs them
(Debian: `prometheus` gives prometheus + promtool, `prometheus-alertmanager` gives
alertmanager + amtool).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from instrumented_core.telemetry import names

pytestmark = pytest.mark.prometheus

ROOT = Path(__file__).resolve().parents[1]
OTEL = ROOT / "otel-config"
RULES = OTEL / "rules"
RULE_FILES = [RULES / "recording.yml", RULES / "alerts.yml", RULES / "reachability.yml"]
ALERT_FILES = [RULES / "alerts.yml", RULES / "reachability.yml"]
RUNBOOK_BASE = "runbooks.md"  # the default runbookUrlBase: the file next to the rules
REQUIRED_ALERTS = {
    "VllmDpSyncAllReduceStuck",
    "VllmDpRankNotProgressing",
    "VllmDpPauseConsensusSlow",
    "VllmDpSyncRoundSkew",
    "VllmDpStartDpWaveActedWhilePaused",
    "VllmDpGroupWedged",
    "VllmDpRankWedged",
    "VllmDpRankUnreachable",
    "VllmDpPeersStalledOnUnreachableRank",
}
# Alerts about a whole DP group (job, model_name): no single rank is known to be the culprit,
# so they carry no `engine` label and name the ranks involved in their description instead.
# Every other alert is about one rank and names it in `engine`.
GROUP_ALERTS = {"VllmDpGroupWedged"}

# Component type names (the ids used in a collector config) shipped by the OpenTelemetry
# Collector contrib distribution, from its builder manifest
# (opentelemetry-collector-releases distributions/otelcol-contrib/manifest.yaml, v0.135/0.136).
# There is no collector binary here, so this list is what "belongs to otelcol-contrib" means.
OTELCOL_CONTRIB = {
    "receivers": {
        "otlp", "nop", "prometheus", "hostmetrics", "filelog", "journald", "kafka", "jaeger",
        "zipkin", "opencensus", "statsd", "carbon", "collectd", "influxdb", "fluentforward",
        "k8s_cluster", "k8s_events", "k8sobjects", "kubeletstats", "docker_stats", "syslog",
        "tcplog", "udplog", "prometheus_simple", "receiver_creator", "simpleprometheus",
        "httpcheck", "jmx", "redis", "postgresql", "mysql", "mongodb", "nginx", "apache",
        "elasticsearch", "rabbitmq", "sqlquery", "windowseventlog", "windowsperfcounters",
        "awsxray", "awscloudwatch", "datadog", "splunk_hec", "signalfx", "skywalking",
        "purefa", "snmp", "sshcheck", "otlpjsonfile", "webhookevent", "filestats",
    },
    "processors": {
        "batch", "memory_limiter", "attributes", "resource", "resourcedetection", "transform",
        "filter", "k8sattributes", "metricstransform", "probabilistic_sampler",
        "tail_sampling", "span", "groupbyattrs", "groupbytrace", "cumulativetodelta",
        "deltatocumulative", "deltatorate", "metricsgeneration", "redaction", "routing",
        "interval", "logdedup", "remotetap", "schema", "geoip", "sumologic", "coralogix",
        "isolationforest", "metricstarttime",
    },
    "exporters": {
        "otlp", "otlphttp", "debug", "nop", "prometheus", "prometheusremotewrite", "file",
        "kafka", "loadbalancing", "zipkin", "elasticsearch", "opensearch", "clickhouse",
        "datadog", "splunk_hec", "signalfx", "awsxray", "awsemf", "awss3",
        "awscloudwatchlogs", "googlecloud", "googlemanagedprometheus", "azuremonitor",
        "influxdb", "carbon", "sapm", "sentry", "syslog", "otelarrow", "loki",
    },
    "extensions": {
        "health_check", "pprof", "zpages", "basicauth", "bearertokenauth", "oauth2client",
        "oidc", "headers_setter", "file_storage", "db_storage", "k8s_observer",
        "docker_observer", "host_observer", "sigv4auth", "opamp", "jaegerremotesampling",
        "http_forwarder", "ack", "asapclient", "awsproxy", "k8s_leader_elector",
    },
    "connectors": {
        "forward", "count", "spanmetrics", "servicegraph", "routing", "exceptions",
        "roundrobin", "sum", "failover", "datadog", "grafanacloud", "otlpjson", "signaltometrics",
    },
}


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        pytest.fail(f"{name} is not installed (apt-get install prometheus prometheus-alertmanager)")
    return path


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def load(path: Path):
    return yaml.safe_load(path.read_text())


def alert_rules(files: list[Path] = ALERT_FILES) -> list[dict]:
    return [r for f in files for g in load(f)["groups"] for r in g["rules"] if "alert" in r]


def github_anchors(markdown: str) -> set[str]:
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", markdown, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


# --- Prometheus ----------------------------------------------------------------------------


def test_promtool_check_config_accepts_prometheus_yml_and_its_rule_files():
    out = run(tool("promtool"), "check", "config", str(OTEL / "prometheus.yml")).stdout
    assert "2 rule files found" in out


def test_prometheus_yml_scrapes_one_target_per_rank_from_base_port_8100():
    config = load(OTEL / "prometheus.yml")
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "vllm-dp")
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"127.0.0.1:{8100 + rank}" for rank in range(4)]
    for sc in job["static_configs"]:
        assert names.LABEL_ENGINE not in sc.get("labels", {}), "would clash with the ranks' label"
    assert sorted(config["rule_files"]) == ["rules/alerts.yml", "rules/recording.yml"]


def test_promtool_check_rules_accepts_recording_and_alert_rules():
    run(tool("promtool"), "check", "rules", *map(str, RULE_FILES))


@pytest.mark.parametrize("tests", ["alerts_test.yml", "reachability_test.yml"])
def test_promtool_unit_tests_of_every_alert_pass(tests):
    out = run(tool("promtool"), "test", "rules", tests, cwd=RULES).stdout
    assert "SUCCESS" in out


def test_the_multihost_config_loads_every_rule_file():
    out = run(tool("promtool"), "check", "config", str(OTEL / "prometheus-multihost.yml")).stdout
    assert "3 rule files found" in out
    assert load(OTEL / "prometheus-multihost.yml")["rule_files"] == [
        f"rules/{p.name}" for p in RULE_FILES]


def test_reachability_unit_tests_fire_every_alert_with_labels_and_annotations_and_stay_silent():
    rules = {r["alert"] for r in alert_rules([RULES / "reachability.yml"])}
    cases = [c for t in load(RULES / "reachability_test.yml")["tests"]
             for c in t["alert_rule_test"]]
    for name in rules:
        fired = [e for c in cases if c["alertname"] == name for e in c["exp_alerts"]]
        assert fired, f"{name}: no firing case"
        assert all(e["exp_labels"].get(names.LABEL_ENGINE) for e in fired), name
        assert all(set(e["exp_annotations"]) >= {"summary", "description", "runbook_url"}
                   for e in fired), name
        assert any(c["alertname"] == name and c["exp_alerts"] == [] for c in cases), name


def test_alert_unit_tests_cover_both_sides_of_every_for_boundary():
    rules = {r["alert"]: r for r in alert_rules([RULES / "alerts.yml"])}
    tests = load(RULES / "alerts_test.yml")["tests"]
    firing, silent = {}, {}
    for t in tests:
        for case in t.get("alert_rule_test", []):
            at = _seconds(case["eval_time"])
            (firing if case.get("exp_alerts") else silent).setdefault(case["alertname"], []).append(at)
    for name in rules:
        assert name in firing, f"{name}: no firing case"
        assert any(at - 1 in silent.get(name, []) for at in firing[name]), (
            f"{name}: no silent case one evaluation (1 s) before a firing case")
        for case in (c for t in tests for c in t.get("alert_rule_test", [])
                     if c["alertname"] == name and c.get("exp_alerts")):
            for exp in case["exp_alerts"]:
                labels = exp["exp_labels"]
                if name in GROUP_ALERTS:
                    assert names.LABEL_ENGINE not in labels, f"{name}: a group alert names a rank"
                    assert labels.get("job") and labels.get(names.LABEL_MODEL_NAME), (
                        f"{name}: no job / model_name label")
                else:
                    assert labels.get(names.LABEL_ENGINE), f"{name}: no engine label"
                assert set(exp["exp_annotations"]) >= {"summary", "description", "runbook_url"}
    quiet = [t for t in tests if "normal" in t["name"] or "idle" in t["name"]]
    assert len(quiet) >= 2
    for t in quiet:
        checked = {c["alertname"] for c in t["alert_rule_test"] if c["exp_alerts"] == []}
        assert checked == set(rules), f"{t['name']!r} does not check every alert stays silent"


def _seconds(value: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600}
    return sum(int(num) * units[unit] for num, unit in re.findall(r"(\d+)([smh])", value))


def test_every_alert_has_for_severity_summary_description_and_runbook():
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= REQUIRED_ALERTS
    runbooks = github_anchors((OTEL / "runbooks.md").read_text())
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"VllmDp[A-Z][A-Za-z]+", name), name
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), f"{name}: no for:"
        assert rule["labels"].get("severity") in {"critical", "warning", "info"}, name
        ann = rule["annotations"]
        assert ann.get("summary"), name
        if name in GROUP_ALERTS:
            assert "$labels.model_name" in ann.get("description", ""), f"{name}: names no group"
            assert "$s.Labels.engine" in ann["description"], f"{name}: lists no ranks"
        else:
            assert "$labels.engine" in ann.get("description", ""), f"{name}: description names no rank"
        assert ann["runbook_url"] == f"{RUNBOOK_BASE}#{name.lower()}", name
        assert name.lower() in runbooks, f"{name}: no section in runbooks.md"


def test_rules_only_read_series_the_names_module_defines():
    known = names.exposed_series_names()
    recorded = {r["record"] for g in load(RULES / "recording.yml")["groups"] for r in g["rules"]}
    for path in RULE_FILES:
        for group in load(path)["groups"]:
            for rule in group["rules"]:
                texts = [rule["expr"], *rule.get("annotations", {}).values()]
                for text in texts:
                    for token in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
                        if token.startswith(names.PREFIX):
                            assert token in known, f"{path.name}: unknown series {token}"
                        elif ":" in token and "vllm_dp_" in token:
                            assert token in recorded, f"{path.name}: unknown rule {token}"


# --- Alertmanager --------------------------------------------------------------------------


def test_amtool_accepts_the_alertmanager_example_with_a_webhook_receiver():
    run(tool("amtool"), "check-config", str(OTEL / "alertmanager.yml"))
    config = load(OTEL / "alertmanager.yml")
    assert any(r.get("webhook_configs") for r in config["receivers"])
    assert "engine" in config["route"]["group_by"]


# --- OpenTelemetry Collector ---------------------------------------------------------------


def test_collector_config_parses_and_every_pipeline_component_is_defined_and_in_contrib():
    config = load(OTEL / "collector.yaml")
    service = config["service"]
    used: dict[str, set[str]] = {kind: set() for kind in OTELCOL_CONTRIB}
    for pipeline_id, pipeline in service["pipelines"].items():
        assert pipeline_id.split("/")[0] in {"traces", "metrics", "logs"}, pipeline_id
        assert pipeline.get("receivers") and pipeline.get("exporters"), pipeline_id
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                section = kind
                if component not in config.get(kind, {}) and component in config.get("connectors", {}):
                    section = "connectors"
                assert component in (config.get(section) or {}), (
                    f"pipeline {pipeline_id}: {kind[:-1]} {component!r} is not defined")
                used[section].add(component)
    for component in service.get("extensions", []):
        assert component in config.get("extensions", {}), f"extension {component!r} not defined"
        used["extensions"].add(component)
    for kind, defined in OTELCOL_CONTRIB.items():
        for component in config.get(kind) or {}:
            assert component.split("/")[0] in defined, (
                f"{kind[:-1]} {component!r} is not part of otelcol-contrib")
            assert component in used[kind], f"{kind[:-1]} {component!r} defined but unused"
    pipelines = service["pipelines"]
    assert "otlp" in pipelines["traces"]["receivers"]
    assert any(e.split("/")[0] in {"otlp", "otlphttp"} for e in pipelines["traces"]["exporters"])
    assert any(p.split("/")[0] == "batch" for p in pipelines["traces"]["processors"])


def test_collector_config_expects_only_what_the_ranks_send():
    """Spans only: no metrics pipeline while no code sends OTLP metrics, and no processor
    reading resource attributes the ranks' spans do not carry."""
    config = load(OTEL / "collector.yaml")
    assert set(config["service"]["pipelines"]) == {"traces"}
    sources = "\n".join(p.read_text() for p in (ROOT / "instrumented_core").rglob("*.py"))
    assert "MeterProvider" not in sources and "OTLPMetricExporter" not in sources, (
        "the plugin now sends OTLP metrics: give the collector a metrics pipeline again")
    for name in config.get("processors", {}):
        assert not name.startswith(("resource", "attributes", "transform")), (
            f"{name}: the collector remaps attributes; check they are on the resource")


# --- Dashboards ----------------------------------------------------------------------------


def test_dashboard_json_is_up_to_date_valid_and_queries_only_known_series():
    run(sys.executable, "-m", "dashboards.generate", "--check")


def test_dashboard_queries_parse_as_promql(tmp_path):
    from dashboards.generate import expanded_queries

    rules = []
    for name, queries in expanded_queries(model_name="m", engine="0|1").items():
        for title, expr in queries:
            rules.append({"record": f"dashboard:q{len(rules)}", "expr": expr,
                          "labels": {"panel": f"{name}: {title}"}})
    assert len(rules) >= 20
    path = tmp_path / "dashboard_queries.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    run(tool("promtool"), "check", "rules", str(path))


def test_dashboards_have_the_datasource_model_and_engine_variables():
    import json

    for name in ("dp_pause_consensus.json", "stuck_rank.json"):
        data = json.loads((ROOT / "dashboards" / name).read_text())
        variables = {v["name"]: v for v in data["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        assert variables[names.LABEL_MODEL_NAME]["type"] == "query"
        assert variables[names.LABEL_ENGINE]["multi"] is True
        assert "${datasource}" in json.dumps(data)
