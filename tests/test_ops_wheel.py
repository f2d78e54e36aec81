"""The production install, from a wheel: the ops bundle is in it, test-only code is not.

Builds the production wheel and the instrumented-core-testing wheel from a copy of the sources,
installs them into a fresh venv outside the checkout (``--system-site-packages`` only to reuse
torch, vLLM and the other dependencies; ``instrumented_core`` itself must come from the venv),
runs ``instrumented-core ops export`` there, and checks the exported files with the real tools:
``promtool check rules`` / ``test rules`` / ``check config``, ``amtool check-config``, the
dashboard check of ``dashboards.generate``, ``kubernetes-validate`` and the prometheus-operator
CRD models, and promtool on the PrometheusRule's groups. Then vLLM's own plugin loader, in the
venv, finds the test-only plugins of the testing wheel and nothing else registers them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.test_ops_static import tool

pytestmark = pytest.mark.prometheus

ROOT = Path(__file__).resolve().parents[1]
TEST_ONLY_MODULES = {"faults.py", "legacy_pause.py", "otlp_sink.py", "cpu_dp.py", "schedules.py"}
#: The lab's network faults (tests/netns.py): never in the production wheel.
LAB_FAULTS = ("partition", "heal", "cut_monitor", "restore_monitor", "slow_link", "fast_link")


def _run(*args: str | Path, cwd: Path, env: dict | None = None,
         timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def _clean_env() -> dict[str, str]:
    """No PYTHONPATH (it would put a checkout first) and no pip config pointing anywhere."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env["PIP_NO_INDEX"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """(venv python, production wheel, testing wheel, work dir), built and installed once."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    shutil.copytree(ROOT / "instrumented_core", src / "instrumented_core", ignore=ignore)
    shutil.copytree(ROOT / "testing", src / "testing", ignore=ignore)
    wheels = work / "wheels"
    env = _clean_env()
    for project in (src, src / "testing"):
        _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
             "-w", wheels, project, cwd=work, env=env)
    (prod,) = wheels.glob("instrumented_core-*.whl")
    (testing,) = wheels.glob("instrumented_core_testing-*.whl")
    _run(sys.executable, "-m", "venv", "--system-site-packages", work / "venv", cwd=work)
    python = work / "venv" / "bin" / "python"
    _run(python, "-m", "pip", "install", "-q", "--no-deps", prod, testing, cwd=work, env=env)
    return python, prod, testing, work


def test_the_wheel_ships_the_bundle_and_no_test_only_code_or_plugin(venv):
    _, prod, testing, _ = venv
    with zipfile.ZipFile(prod) as whl:
        names = whl.namelist()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        plugins = _group(whl.read(entry_points).decode(), "vllm.general_plugins")
    assert plugins == {"instrumented_core": "instrumented_core.vllm_support.plugin:register"}
    assert not {Path(n).name for n in names} & TEST_ONLY_MODULES
    with zipfile.ZipFile(prod) as whl:  # nor the randomized schedules, under any file name
        assert not [n for n in names if n.endswith(".py")
                    and b"def run_random_schedule" in whl.read(n)]
        # the multi-host lab's plumbing ships (demo --hosts); its fault injection does not
        assert "instrumented_core/cluster/netns.py" in names
        assert not [(n, fault) for n in names if n.endswith(".py") for fault in LAB_FAULTS
                    if f"def {fault}(".encode() in whl.read(n)]
    for needed in ("rules/alerts.yml", "rules/recording.yml", "rules/alerts_test.yml",
                   "rules/reachability.yml", "rules/reachability_test.yml", "prometheus-multihost.yml",
                   "dashboards/stuck_rank.json", "dashboards/dp_pause_consensus.json",
                   "runbooks.md", "alertmanager.yml", "collector.yaml", "prometheus.yml"):
        assert f"instrumented_core/ops/bundle/{needed}" in names, needed
    with zipfile.ZipFile(testing) as whl:
        (entry_points,) = [n for n in whl.namelist() if n.endswith("entry_points.txt")]
        plugins = _group(whl.read(entry_points).decode(), "vllm.general_plugins")
    assert plugins == {
        "instrumented_core_cpu_dp": "instrumented_core_testing.cpu_dp:register",
        "instrumented_core_legacy_pause": "instrumented_core_testing.legacy_pause:register"}


def _group(text: str, group: str) -> dict[str, str]:
    out, current = {}, None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            current = line.strip("[]")
        elif "=" in line and current == group:
            name, value = (s.strip() for s in line.split("=", 1))
            out[name] = value
    return out


def test_an_export_from_the_installed_wheel_passes_promtool_the_dashboard_check_and_kubernetes_schemas(venv):
    python, _, _, work = venv
    env = _clean_env()
    where = _run(python, "-c", "import instrumented_core, instrumented_core_testing; "
                 "print(instrumented_core.__file__); print(instrumented_core_testing.__file__)",
                 cwd=work, env=env).stdout.split()
    assert all(Path(p).is_relative_to(work / "venv") for p in where), where
    out = work / "export"
    cli = work / "venv" / "bin" / "instrumented-core"
    _run(cli, "ops", "export", "--out", out, cwd=work, env=env)

    promtool = tool("promtool")
    rules = out / "rules"
    _run(promtool, "check", "rules", rules / "recording.yml", rules / "alerts.yml",
         rules / "reachability.yml", cwd=out)
    assert "SUCCESS" in _run(promtool, "test", "rules", "alerts_test.yml", cwd=rules).stdout
    assert "SUCCESS" in _run(promtool, "test", "rules", "reachability_test.yml", cwd=rules).stdout
    assert "3 rule files found" in _run(promtool, "check", "config", "prometheus-multihost.yml",
                                        cwd=out).stdout
    assert "2 rule files found" in _run(promtool, "check", "config", "prometheus.yml",
                                        cwd=out).stdout
    _run(tool("amtool"), "check-config", out / "alertmanager.yml", cwd=out)

    rule = yaml.safe_load((out / "kubernetes" / "prometheusrule.yaml").read_text())
    (out / "prometheusrule-groups.yml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    _run(promtool, "check", "rules", out / "prometheusrule-groups.yml", cwd=out)

    from dashboards.schema import _queries, _schema_errors, series_names
    from instrumented_core.telemetry.names import exposed_series_names

    known = exposed_series_names()
    for path in sorted((out / "dashboards").glob("*.json")):
        data = json.loads(path.read_text())
        assert _schema_errors(path.name, data) == []
        for title, expr in _queries(data):
            assert series_names(expr) <= known, (path.name, title)

    import kubernetes_validate
    from cloudcoil.models.prometheus_operator import v1

    for name in ("grafana-dashboards.yaml", "vllm-deployment.example.yaml"):
        for doc in yaml.safe_load_all((out / "kubernetes" / name).read_text()):
            kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    for name, model in (("podmonitor.yaml", v1.PodMonitor), ("prometheusrule.yaml", v1.PrometheusRule)):
        doc = yaml.safe_load((out / "kubernetes" / name).read_text())
        back = model.model_validate(doc).model_dump_json(by_alias=True, exclude_none=True)
        assert json.loads(back) == doc, name


def test_a_configured_export_from_the_installed_wheel_passes_promtool(venv):
    python, _, _, work = venv
    env = _clean_env()
    out = work / "configured"
    (work / "ops.yaml").write_text("syncStuckSeconds: 20\nrankWedgedFor: 45s\n")
    _run(work / "venv" / "bin" / "instrumented-core", "ops", "export", "--out", out,
         "--config", work / "ops.yaml", "--selector", 'job="vllm-prod", namespace="llm"',
         "--runbook-url-base", "https://wiki.example.com/vllm-dp", cwd=work, env=env)
    promtool = tool("promtool")
    _run(promtool, "check", "rules", out / "rules" / "recording.yml", out / "rules" / "alerts.yml",
         out / "rules" / "reachability.yml", cwd=out)
    alerts = yaml.safe_load((out / "rules" / "alerts.yml").read_text())["groups"][0]["rules"]
    wedged = next(r for r in alerts if r["alert"] == "VllmDpRankWedged")
    assert wedged["for"] == "45s"
    assert 'vllm_dp_worker_heartbeat_age_seconds{job="vllm-prod", namespace="llm"}' in wedged["expr"]
    assert not (out / "rules" / "alerts_test.yml").exists()
    # another job at the default thresholds: the unit tests follow the job and pass
    _run(work / "venv" / "bin" / "instrumented-core", "ops", "export", "--out", work / "job",
         "--job", "vllm-prod", cwd=work, env=env)
    assert "SUCCESS" in _run(promtool, "test", "rules", "alerts_test.yml",
                             cwd=work / "job" / "rules").stdout


def test_a_bad_export_option_from_the_installed_command_is_one_line_and_exit_2(venv):
    _, _, _, work = venv
    proc = subprocess.run([str(work / "venv" / "bin" / "instrumented-core"), "ops", "export",
                           "--out", str(work / "bad"), "--set", "syncStuckFor=soon"],
                          cwd=work, env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "syncStuckFor='soon'" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (work / "bad").exists()


def test_vllm_finds_the_test_only_plugins_by_entry_point_only_from_the_testing_wheel(venv):
    python, _, _, work = venv
    code = (
        "import json, logging, sys\n"
        "from importlib.metadata import entry_points\n"
        "from vllm.plugins import load_plugins_by_group\n"
        "found = load_plugins_by_group('vllm.general_plugins')\n"
        "eps = {ep.name: ep.dist.name for ep in entry_points(group='vllm.general_plugins')}\n"
        "print(json.dumps({'loaded': {k: f.__module__ for k, f in found.items()}, 'dists': eps}))\n"
    )
    env = _clean_env() | {"VLLM_LOGGING_LEVEL": "INFO"}
    env.pop("VLLM_PLUGINS", None)
    proc = _run(python, "-c", code, cwd=work, env=env, timeout=180)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "Failed to load plugin" not in proc.stderr, proc.stderr[-3000:]
    ours = {k: v for k, v in result["loaded"].items() if k.startswith("instrumented_core")}
    assert ours == {
        "instrumented_core": "instrumented_core.vllm_support.plugin",
        "instrumented_core_cpu_dp": "instrumented_core_testing.cpu_dp",
        "instrumented_core_legacy_pause": "instrumented_core_testing.legacy_pause"}
    assert result["dists"]["instrumented_core"] == "instrumented-core"
    assert result["dists"]["instrumented_core_legacy_pause"] == "instrumented-core-testing"
