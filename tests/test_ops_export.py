"""``instrumented-core ops export`` and its one configuration, without a server.

The mixin is evaluated by the real jsonnet, the Kubernetes manifests are validated against the
Kubernetes schemas (``kubernetes-validate``) and the prometheus-operator CRD models
(``cloudcoil-models-prometheus-operator``). promtool runs on the exported files in
``test_ops_wheel.py`` (from an installed wheel).
"""

from __future__ import annotations

import functools
import json
import re
from contextlib import nullcontext
from pathlib import Path

import pytest
import yaml

from instrumented_core.cli import main
from instrumented_core.ops.config import DEFAULTS, THRESHOLD_KEYS, load_config
from instrumented_core.ops.kubernetes import container_ports
from instrumented_core.ops.render import bundle_files

ROOT = Path(__file__).resolve().parents[1]


def export(**overrides) -> dict[str, str]:
    if not overrides:
        return _default_export()
    return bundle_files(load_config(overrides=overrides))


@functools.cache
def _default_export() -> dict[str, str]:
    return bundle_files(load_config())


def rules(files: dict[str, str]) -> dict[str, dict]:
    """Alert or record name (+ quantile) -> rule, over every rule file."""
    out = {}
    for name in ("rules/recording.yml", "rules/alerts.yml", "rules/reachability.yml"):
        for group in yaml.safe_load(files[name])["groups"]:
            for rule in group["rules"]:
                key = rule.get("alert") or rule["record"] + str(rule.get("labels", {}))
                out[key] = rule
    return out


def dashboard_queries(files: dict[str, str]) -> list[str]:
    text = []
    for path, content in files.items():
        if path.startswith("dashboards/"):
            data = json.loads(content)
            for panel in data["panels"]:
                text += [t["expr"] for t in panel.get("targets", [])]
                text.append(panel.get("options", {}).get("content", ""))
            text += [v["query"] if isinstance(v["query"], str) else v["query"]["query"]
                     for v in data["templating"]["list"] if v["type"] == "query"]
    return text


# --- one configuration ---------------------------------------------------------------------


def test_one_config_changes_the_sync_stuck_threshold_in_rules_dashboards_runbooks_and_kubernetes():
    files = export(syncStuckSeconds=23, syncStuckFor="47s")
    default = export()
    stuck = rules(files)["VllmDpSyncAllReduceStuck"]
    assert stuck["for"] == "47s"
    assert "> 23)" in stuck["expr"] and "> 10)" not in stuck["expr"]
    assert "more than 23s" in stuck["annotations"]["description"]
    waiting = rules(files)["job_model_name:vllm_dp_ranks_waiting_in_sync:count{}"]
    assert "> 23" in waiting["expr"]
    culprit = [q for q in dashboard_queries(files) if "timestamp(vllm_dp_last_progress" in q]
    assert culprit and all("> 23)" in q for q in culprit)
    assert any("after 23 s" in q for q in dashboard_queries(files))
    assert "for more than\n23 s" in files["runbooks.md"]
    assert "| `syncStuckSeconds` | `23` |" in files["runbooks.md"]
    groups = yaml.safe_load(files["kubernetes/prometheusrule.yaml"])["spec"]["groups"]
    assert groups == [g for f in ("rules/recording.yml", "rules/alerts.yml", "rules/reachability.yml")
                      for g in yaml.safe_load(files[f])["groups"]]
    # nothing else moved: every other rule is the default's
    others = {k: v for k, v in rules(files).items()
              if k not in ("VllmDpSyncAllReduceStuck",
                           "job_model_name:vllm_dp_ranks_waiting_in_sync:count{}")}
    assert others == {k: v for k, v in rules(default).items() if k in others}


def test_one_config_changes_the_unreachable_rank_thresholds_in_rules_runbooks_and_kubernetes():
    files = export(peersStalledSeconds=17, peersStalledFor="41s", unreachableFor="52s")
    default = export()
    stalled = rules(files)["VllmDpPeersStalledOnUnreachableRank"]
    assert stalled["for"] == "41s"
    assert "> 17)" in stalled["expr"] and "> 10)" not in stalled["expr"]
    assert "more than 17s" in stalled["annotations"]["description"]
    unreachable = rules(files)["VllmDpRankUnreachable"]
    assert unreachable["for"] == "52s" and "for 52s;" in unreachable["annotations"]["description"]
    assert "for 52s;" in files["runbooks.md"] and "more than 17 s:" in files["runbooks.md"]
    assert "| `peersStalledSeconds` | `17` |" in files["runbooks.md"]
    groups = yaml.safe_load(files["kubernetes/prometheusrule.yaml"])["spec"]["groups"]
    assert yaml.safe_load(files["rules/reachability.yml"])["groups"][0] in groups
    assert [g["name"] for g in groups] == ["vllm-dp.recording", "vllm-dp.alerts",
                                           "vllm-dp.reachability"]
    assert "peersStalledSeconds" in files["mixin/mixin.libsonnet"]
    # the multi-host scrape config loads the same files and follows the job and interval
    multihost = yaml.safe_load(export(job="vllm-prod", scrapeInterval="3s")["prometheus-multihost.yml"])
    assert multihost["global"]["scrape_interval"] == "3s"
    assert multihost["scrape_configs"][0]["job_name"] == "vllm-prod"
    assert multihost["rule_files"] == ["rules/recording.yml", "rules/alerts.yml",
                                       "rules/reachability.yml"]
    # the selector is on the scrape series (up, scrape_duration_seconds) too
    selected = [r["expr"] for r in rules(export(selector='namespace="llm", job=~"vllm-.*"')).values()
                if r.get("alert") in ("VllmDpPeersStalledOnUnreachableRank", "VllmDpRankUnreachable")]
    for name in ("up", "scrape_duration_seconds"):
        matchers = re.findall(rf"(?<![:\w]){name}(\{{[^}}]*\}})?", "".join(selected))
        assert matchers and set(matchers) == {'{namespace="llm", job=~"vllm-.*"}'}, name
    others = {k: v for k, v in rules(files).items()
              if k not in ("VllmDpPeersStalledOnUnreachableRank", "VllmDpRankUnreachable")}
    assert others == {k: v for k, v in rules(default).items() if k in others}


@pytest.mark.parametrize("key", [k for k in DEFAULTS if k != "selector"])
def test_every_option_reaches_the_exported_files(key):
    value = {str: "x9", int: 7}[type(DEFAULTS[key])]
    if key.endswith("For") or key == "scrapeInterval":
        value = "7m"
    elif key == "podSelector":
        value = "app=x9"
    elif key == "runbookUrlBase":
        value = "https://wiki.example.com/x9"
    elif key == "pauseConsensusMaxSeconds":
        value = 977
    changed, default = export(**{key: value}), export()
    differing = [p for p in default if changed.get(p) != default[p]]
    assert differing, f"{key} changes no exported file"
    # dpSize is a count (the kubernetes test checks the ports it makes)
    shown = {"podSelector": "x9", "dpSize": ""}.get(key, str(value))
    assert all(shown in changed[p] for p in differing if p in changed), (
        f"{key}: a file changed without showing the new value")


def test_the_selector_is_on_every_series_the_rules_and_dashboards_read():
    files = export(selector='namespace="llm", job=~"vllm-.*"')
    series = re.compile(r"(?<![:\w])(vllm_dp_[a-z_]+)(\{[^}]*\})?")
    exprs = [r["expr"] for r in rules(files).values()] + dashboard_queries(files)
    checked = 0
    for expr in exprs:
        for name, matchers in series.findall(expr):
            assert matchers.startswith('{namespace="llm", job=~"vllm-.*"'), (name, expr)
            checked += 1
    assert checked > 60


def test_job_alone_selects_that_job_and_names_the_scrape_and_pod_monitor_job():
    files = export(job="vllm-prod")
    assert 'vllm_dp_pause_phase{job="vllm-prod"}' in files["rules/alerts.yml"]
    assert yaml.safe_load(files["prometheus.yml"])["scrape_configs"][0]["job_name"] == "vllm-prod"
    monitor = yaml.safe_load(files["kubernetes/podmonitor.yaml"])
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        assert {"action": "replace", "targetLabel": "job", "replacement": "vllm-prod"} in (
            endpoint["relabelings"])
    # the promtool unit tests follow the job (written for the default thresholds)
    assert 'job="vllm-prod"' in files["rules/alerts_test.yml"]


def test_runbook_urls_follow_the_configured_base_and_default_to_the_exported_runbooks_file():
    for base in (DEFAULTS["runbookUrlBase"], "https://wiki.example.com/vllm-dp"):
        files = export(runbookUrlBase=base)
        anchors = {h.lower() for h in re.findall(r"^## (VllmDp\w+)$", files["runbooks.md"], re.M)}
        for name, rule in rules(files).items():
            if "alert" in rule:
                assert rule["annotations"]["runbook_url"] == f"{base}#{name.lower()}"
                assert name.lower() in anchors
        links = re.findall(r'"url": "([^"]*)"', "".join(
            v for k, v in files.items() if k.startswith("dashboards/")))
        assert links and all(link.startswith(base) for link in links)
    assert "github.com" not in "".join(export().values())


def test_other_thresholds_leave_out_the_unit_tests_written_for_the_defaults(capsys, tmp_path):
    assert "rules/alerts_test.yml" in export()
    for key in THRESHOLD_KEYS:
        value = "9m" if key.endswith("For") else 301 if key == "pauseConsensusMinSeconds" else 999
        overrides = {key: value}
        if key == "pauseConsensusMinSeconds":
            overrides["pauseConsensusMaxSeconds"] = 999
        assert "rules/alerts_test.yml" not in export(**overrides), key
        assert "rules/reachability_test.yml" not in export(**overrides), key
    assert main(["ops", "export", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "rules" / "alerts_test.yml").exists()
    assert main(["ops", "export", "--out", str(tmp_path), "--set", "wedgedSeconds=12"]) == 0
    assert "alerts_test.yml left out" in capsys.readouterr().out
    assert not (tmp_path / "rules" / "alerts_test.yml").exists(), "stale tests left behind"
    assert not (tmp_path / "rules" / "reachability_test.yml").exists(), "stale tests left behind"


def test_a_config_file_and_the_mixin_spelling_of_it_are_read(tmp_path):
    (tmp_path / "ops.yaml").write_text("_config:\n  syncStuckSeconds: 31\n  job: vllm-a\n")
    (tmp_path / "ops.json").write_text(json.dumps({"notProgressingFor": "3m"}))
    config = load_config(tmp_path / "ops.yaml", {"dpSize": "2"})
    assert (config["syncStuckSeconds"], config["selector"], config["dpSize"]) == (
        31, 'job="vllm-a"', 2)
    assert load_config(tmp_path / "ops.json")["notProgressingFor"] == "3m"
    # an export's own ops-config.json reproduces it
    assert main(["ops", "export", "--out", str(tmp_path / "a"), "--config",
                 str(tmp_path / "ops.yaml")]) == 0
    again = load_config(tmp_path / "a" / "ops-config.json")
    assert bundle_files(again) == bundle_files(config | {"dpSize": 4})


# --- the mixin, evaluated by jsonnet --------------------------------------------------------


def _jsonnet(files: dict[str, str], overrides: dict) -> dict:
    import _jsonnet

    snippet = ("local m = (import 'mixin.libsonnet') + {_config+:: " + json.dumps(overrides)
               + "}; {alerts: m.prometheusAlerts, rules: m.prometheusRules,"
               " dashboards: m.grafanaDashboards, config: m._config}")
    mixin = files["mixin/mixin.libsonnet"]

    def importer(base: str, rel: str) -> tuple[str, bytes]:
        if rel != "mixin.libsonnet":
            raise RuntimeError(f"unexpected import {rel}")
        return rel, mixin.encode()

    return json.loads(_jsonnet.evaluate_snippet("test", snippet, import_callback=importer))


@pytest.mark.parametrize("overrides", [
    {},
    {"syncStuckSeconds": 20, "rankWedgedFor": "1m", "selector": 'job="x", namespace="y"',
     "runbookUrlBase": "https://wiki.example.com/rb", "peersStalledSeconds": 17},
], ids=["defaults", "overridden"])
def test_the_mixin_rendered_by_jsonnet_is_the_export(overrides):
    shipped = (ROOT / "otel-config" / "mixin" / "mixin.libsonnet").read_text()
    assert shipped == export()["mixin/mixin.libsonnet"]
    got = _jsonnet({"mixin/mixin.libsonnet": shipped}, overrides)
    want = export(**overrides)
    assert got["alerts"] == {"groups": [g for f in ("rules/alerts.yml", "rules/reachability.yml")
                                        for g in yaml.safe_load(want[f])["groups"]]}
    assert got["rules"] == yaml.safe_load(want["rules/recording.yml"])
    assert got["dashboards"] == {k.split("/")[1]: json.loads(v) for k, v in want.items()
                                 if k.startswith("dashboards/")}
    assert set(got["config"]) == set(DEFAULTS)


# --- Kubernetes ------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [{}, {"namespace": "llm", "dpSize": 8,
                                            "podSelector": "app=vllm,tier=serve"}],
                         ids=["defaults", "dp8"])
def test_kubernetes_manifests_validate_against_kubernetes_and_prometheus_operator_schemas(overrides):
    import kubernetes_validate
    from cloudcoil.models.prometheus_operator import v1

    files = export(**overrides)
    config = load_config(overrides=overrides)
    docs = {path: list(yaml.safe_load_all(text)) for path, text in files.items()
            if path.startswith("kubernetes/")}
    version = kubernetes_validate.latest_version()
    for path in ("kubernetes/grafana-dashboards.yaml", "kubernetes/vllm-deployment.example.yaml"):
        for doc in docs[path]:
            kubernetes_validate.validate(doc, version, strict=True)
    for path, model in (("kubernetes/podmonitor.yaml", v1.PodMonitor),
                        ("kubernetes/prometheusrule.yaml", v1.PrometheusRule)):
        (doc,) = docs[path]
        back = json.loads(model.model_validate(doc).model_dump_json(by_alias=True,
                                                                    exclude_none=True))
        assert back == doc, f"{path}: fields the CRD does not define"
    (monitor,) = docs["kubernetes/podmonitor.yaml"]
    (deployment,) = docs["kubernetes/vllm-deployment.example.yaml"]
    pod = deployment["spec"]["template"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    declared = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
    scraped = [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]]
    assert len(scraped) == config["dpSize"]
    assert [declared[name] for name in scraped] == [
        config["metricsPortBase"] + r for r in range(config["dpSize"])]
    assert [p["name"] for p in container_ports(config)] == scraped
    maps = docs["kubernetes/grafana-dashboards.yaml"]
    assert len(maps) == 2
    for cm in maps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((name, text),) = cm["data"].items()
        assert json.loads(text) == json.loads(files[f"dashboards/{name}"])
    assert all(d["metadata"]["namespace"] == config["namespace"]
               for ds in docs.values() for d in ds)


# --- bad options -----------------------------------------------------------------------------

BAD = [
    (["--set", "bogus=1"], "unknown option 'bogus'"),
    (["--set", "syncStuckSeconds=ten"], "not a whole number"),
    (["--set", "syncStuckSeconds=0"], "out of range"),
    (["--set", "syncStuckFor=15"], "not a Prometheus duration"),
    (["--set", "novalue"], "--set takes KEY=VALUE"),
    (["--selector", "job=vllm"], "not a list of label matchers"),
    (["--selector", ""], "not a list of label matchers"),
    (["--job", 'a"b'], "not a usable job name"),
    (["--runbook-url-base", "https://x/y#z"], "runbookUrlBase"),
    (["--namespace", "Prod_NS"], "not a Kubernetes namespace name"),
    (["--dp-size", "0"], "out of range"),
    (["--set", "podSelector=app"], "podSelector"),
    (["--set", "metricsPortBase=65535", "--dp-size", "4"], "runs past port 65535"),
    (["--set", "pauseConsensusMinSeconds=400"], "pauseConsensusMinSeconds is above"),
    (["--config", "/nonexistent/ops.yaml"], "cannot read config file"),
]


@pytest.mark.parametrize("flags,message", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_a_bad_option_is_one_line_naming_it_and_exit_2(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) if flags == ["--set", "novalue"] else nullcontext() as exited:
        code = main(["ops", "export", "--out", str(tmp_path / "out"), *flags])
    if exited is not None:
        code = exited.value.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_an_unusable_out_or_config_file_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "bad.yaml").write_text("a: [1\n")
    (tmp_path / "list.json").write_text("[1, 2]")
    cases = [(["--out", str(tmp_path / "file")], "is a file"),
             (["--out", str(tmp_path / "file" / "sub")], "cannot write"),
             (["--out", str(tmp_path / "o"), "--config", str(tmp_path / "bad.yaml")],
              "is not valid YAML"),
             (["--out", str(tmp_path / "o"), "--config", str(tmp_path / "list.json")],
              "not a mapping")]
    for flags, message in cases:
        assert main(["ops", "export", *flags]) == 2, flags
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err, err


# --- what the production package holds --------------------------------------------------------


def test_the_production_package_registers_and_holds_no_test_only_code():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["vllm.general_plugins"] == {
        "instrumented_core": "instrumented_core.vllm_support.plugin:register"}
    shipped = {p.name for p in (ROOT / "instrumented_core").rglob("*.py")}
    assert not shipped & {"faults.py", "legacy_pause.py", "otlp_sink.py", "cpu_dp.py"}
    testing = tomllib.loads((ROOT / "testing" / "pyproject.toml").read_text())["project"]
    assert set(testing["entry-points"]["vllm.general_plugins"]) == {
        "instrumented_core_cpu_dp", "instrumented_core_legacy_pause"}


def test_the_vllm_demo_without_the_testing_distribution_says_so_in_one_line(monkeypatch):
    import importlib.metadata
    import importlib.util
    from types import SimpleNamespace

    from instrumented_core.vllm_support import demo

    production = [importlib.metadata.EntryPoint(
        "instrumented_core", "instrumented_core.vllm_support.plugin:register",
        "vllm.general_plugins")]
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None: production if group == "vllm.general_plugins" else [])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())  # "vllm installed"
    args = SimpleNamespace(ranks=None, fault="stall", cadence="fixed", fault_rank=None)
    reason = demo.check_args(args)
    assert reason is not None and "pip install ./testing" in reason and "\n" not in reason
    assert not demo.test_plugins_installed()


def test_the_docs_alert_table_names_each_alerts_severity_and_for_from_the_configuration():
    text = (ROOT / "docs" / "ops.md").read_text()
    rows = dict(re.findall(r"^\| (VllmDp\w+) \| (\w+, `\w+`) \|", text, re.M))
    alerts = {k: r for k, r in rules(export()).items() if "alert" in r}
    assert set(rows) == set(alerts)
    for name, rule in alerts.items():
        severity, key = re.fullmatch(r"(\w+), `(\w+)`", rows[name]).groups()
        assert severity == rule["labels"]["severity"], name
        assert DEFAULTS[key] == rule["for"], f"{name}: docs say for: {key}, the rule differs"
    # numbers live in the generated configuration table only
    assert "| `syncStuckSeconds` | `10` |" in text
