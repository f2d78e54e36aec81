"""The ops bundle, live: a real Prometheus and Alertmanager against a real CPU cluster.

Each test starts its own DP 4 cluster (metrics on free loopback ports) and its own Prometheus
(fresh storage, so one test's series and alerts never leak into the other's assertions); the
module shares one Alertmanager and the webhook receiver it delivers to. Both configs are
derived from the shipped ones (``otel-config/prometheus.yml``, ``otel-config/alertmanager.yml``):
only the targets, ports and intervals change, the rule files are the shipped ones unchanged.
Every process is ended in ``finally``; every wait is bounded; a missing binary fails the test.

- a stalled rank: every dashboard panel query returns data, ``VllmDpSyncAllReduceStuck`` fires
  with the stalled rank's ``engine`` label and the Alertmanager delivers it to the webhook;
- an idle period longer than every threshold, the wake-up after it (ranks scraped at different
  instants) and normal keep pauses under traffic: no alert, not even a pending one.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from dashboards.generate import expanded_queries
from instrumented_core.cluster import Cluster, ClusterConfig
from instrumented_core.cluster.client import free_port
from instrumented_core.doctor import run_doctor
from instrumented_core.telemetry import TelemetryConfig
from instrumented_core.telemetry import names as n
from conftest import require_tool

pytestmark = [pytest.mark.prometheus, pytest.mark.cluster]

ROOT = Path(__file__).resolve().parents[1]
OTEL = ROOT / "otel-config"
JOB = "vllm-dp"
STUCK_ALERT = "VllmDpSyncAllReduceStuck"
STALLED_RANK = 2
RANKS = 4
INTERVAL = "1s"  # scrape and rule evaluation


# --- processes and HTTP ----------------------------------------------------------------------


class Server:
    """A binary started on a free loopback port, its output in a log file; ``stop`` ends it."""

    def __init__(self, name: str, argv: list[str], url: str, log: Path) -> None:
        self.name, self.url, self.log = name, url, log
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen(argv, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)

    def wait_ready(self, path: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + path, timeout=1.0) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name} not ready on {self.url}{path} within {timeout} s:\n"
                            f"{self.tail()}")
            time.sleep(0.2)

    def tail(self, lines: int = 30) -> str:
        self._log_file.flush()
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log_file.close()


def get_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


class Webhook:
    """The Alertmanager webhook receiver: keeps every JSON payload POSTed to it."""

    def __init__(self) -> None:
        self.payloads: list[dict] = []
        self._lock = threading.Lock()
        received = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server API)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with received._lock:
                    received.payloads.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def alerts(self) -> list[dict]:
        """Every alert of every payload so far, with the payload's status."""
        with self._lock:
            return [a for p in self.payloads for a in p.get("alerts", [])]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


class Prometheus(Server):
    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}"
        try:
            body = get_json(url)
        except urllib.error.HTTPError as e:
            pytest.fail(f"query failed ({e.code}): {expr}\n{e.read().decode(errors='replace')}")
        assert body["status"] == "success", body
        return body["data"]["result"]

    def alerts(self) -> list[dict]:
        """Pending and firing alerts, as /api/v1/alerts lists them."""
        return get_json(f"{self.url}/api/v1/alerts")["data"]["alerts"]

    def wait_for(self, what: str, condition, timeout: float, poll: float = 0.5):
        deadline = time.monotonic() + timeout
        while True:
            result = condition()
            if result:
                return result
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not within {timeout} s\n{self.tail(10)}")
            time.sleep(poll)


# --- configs derived from the shipped ones ---------------------------------------------------


def alertmanager_config(webhook_url: str) -> dict:
    config = yaml.safe_load((OTEL / "alertmanager.yml").read_text())
    hooks = [w for r in config["receivers"] for w in r.get("webhook_configs", [])]
    assert hooks, "otel-config/alertmanager.yml has no webhook receiver"
    for hook in hooks:
        hook["url"] = webhook_url
    return config


def prometheus_config(targets: list[str], alertmanager: str) -> dict:
    """The shipped prometheus.yml with this cluster's rank targets, 1 s intervals, this
    Alertmanager, and the shipped rule files (by absolute path)."""
    config = yaml.safe_load((OTEL / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=INTERVAL, scrape_timeout=INTERVAL,
                            evaluation_interval=INTERVAL)
    config["rule_files"] = [str((OTEL / f).resolve()) for f in config["rule_files"]]
    assert [r for r in config["rule_files"] if r.endswith("alerts.yml")], config["rule_files"]
    config["alerting"]["alertmanagers"] = [{"static_configs": [{"targets": [alertmanager]}]}]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    ranks = jobs[JOB]
    shipped = [t for sc in ranks["static_configs"] for t in sc["targets"]]
    assert len(shipped) == RANKS, f"shipped {JOB} job should list {RANKS} rank targets"
    # As shipped: one target per rank and no `engine` target label (the ranks export theirs).
    assert all("engine" not in sc.get("labels", {}) for sc in ranks["static_configs"])
    ranks["static_configs"] = [{"targets": targets}]
    # No collector runs here; its job would only add a down target.
    config["scrape_configs"] = [ranks]
    return config


def target(url: str) -> str:
    parsed = urllib.parse.urlparse(url)
    assert parsed.path == "/metrics", url
    return parsed.netloc


@pytest.fixture(scope="module")
def alertmanager(tmp_path_factory):
    binary = require_tool("prometheus-alertmanager")
    tmp = tmp_path_factory.mktemp("alertmanager")
    webhook = Webhook()
    server = None
    try:
        (tmp / "alertmanager.yml").write_text(yaml.safe_dump(alertmanager_config(webhook.url)))
        port = free_port()
        server = Server("alertmanager", [
            binary, f"--config.file={tmp / 'alertmanager.yml'}",
            f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=",
            f"--storage.path={tmp / 'data'}", "--log.level=warn",
        ], f"http://127.0.0.1:{port}", tmp / "alertmanager.log")
        server.wait_ready("/-/ready")
        server.webhook = webhook
        yield server
    finally:
        if server is not None:
            server.stop()
        webhook.close()


@contextmanager
def prometheus(tmp: Path, cluster: Cluster, alertmanager: Server):
    binary = require_tool("prometheus")
    config = prometheus_config([target(u) for u in cluster.metrics_urls],
                               alertmanager.url.removeprefix("http://"))
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    server = Prometheus("prometheus", [
        binary, f"--config.file={tmp / 'prometheus.yml'}",
        f"--web.listen-address=127.0.0.1:{port}", f"--storage.tsdb.path={tmp / 'data'}",
        "--log.level=warn",
    ], f"http://127.0.0.1:{port}", tmp / "prometheus.log")
    try:
        server.wait_ready("/-/ready")
        # Every rank scraped, with its own engine label, at least twice (rates need two).
        server.wait_for("every rank target up", lambda: len(server.query(
            f'count_over_time(up{{job="{JOB}"}}[1m]) >= 2 and up{{job="{JOB}"}} == 1')) == RANKS,
            timeout=20)
        engines = {s["metric"]["engine"]: s["metric"]["instance"]
                   for s in server.query(f'{n.PHASE}{{job="{JOB}"}}')}
        assert engines == {str(r): target(u) for r, u in enumerate(cluster.metrics_urls)}
        yield server
    finally:
        server.stop()


def cluster_config(tmp: Path, model_name: str) -> ClusterConfig:
    return ClusterConfig(ranks=RANKS, sync_interval=8, hang_timeout=20, telemetry=TelemetryConfig(
        metrics_port_base=0, spans_file=str(tmp / "spans.jsonl"), model_name=model_name))


def traffic_and_pause(cluster: Cluster, tokens: int = 150, paused_for: float = 1.5) -> None:
    """Requests on every rank, a keep pause in the middle of them, resume, all complete."""
    handles = [cluster.generate(tokens, rank=r) for r in range(RANKS)]
    time.sleep(0.3)
    cluster.pause("keep")
    time.sleep(paused_for)
    cluster.resume()
    assert [h.result(30) for h in handles] == ["completed"] * RANKS


# --- the tests -------------------------------------------------------------------------------


def test_stalled_rank_feeds_every_panel_and_its_stuck_alert_reaches_the_webhook(
        tmp_path, alertmanager):
    model = "live-stall"
    started = time.monotonic()
    with Cluster(cluster_config(tmp_path, model)) as cluster, \
            prometheus(tmp_path, cluster, alertmanager) as prom:
        # Before the stall: traffic, a pause and a resume, so the histograms, pause counters
        # and dummy steps have moved inside the dashboards' rate window.
        traffic_and_pause(cluster)
        time.sleep(2.5)  # let the post-resume counters be scraped twice
        cluster.inject_fault(STALLED_RANK, "stall")
        cluster.generate(50, rank=0)
        stalled_at = time.monotonic()

        def stuck_firing():
            return [a for a in prom.alerts()
                    if a["labels"]["alertname"] == STUCK_ALERT and a["state"] == "firing"]

        # 10 s inside the all-reduce + for: 15s + scrape / evaluation / send delays.
        firing = prom.wait_for(f"{STUCK_ALERT} firing", stuck_firing, timeout=45)
        fired_after = time.monotonic() - stalled_at
        assert [a["labels"]["engine"] for a in firing] == [str(STALLED_RANK)]
        labels = firing[0]["labels"]
        assert labels["model_name"] == model and labels["job"] == JOB
        assert labels["severity"] == "critical"
        description = firing[0]["annotations"]["description"]
        peers = ", ".join(str(r) for r in range(RANKS) if r != STALLED_RANK)
        assert f"Rank {STALLED_RANK} of {model}" in description
        assert f"(engines {peers})" in description, description

        # Every panel query, with the variables filled in, returns data now. The rate window
        # covers the pause and the traffic before the stall.
        now = time.time()
        empty = []
        panels = 0
        for name, queries in expanded_queries(model, rate_interval="2m").items():
            for title, expr in queries:
                panels += 1
                if not prom.query(expr, at=now):
                    empty.append(f"{name}: {title!r}: {expr}")
        assert panels >= 15
        assert not empty, "panel queries without data:\n" + "\n".join(empty)
        culprit = dict(expanded_queries(model)["stuck_rank.json"])["Culprit rank (stalled for)"]
        assert [s["metric"]["engine"] for s in prom.query(culprit, at=now)] == [str(STALLED_RANK)]

        # The Alertmanager delivers it (critical route: no group_wait) to the webhook.
        def delivered():
            return [a for a in alertmanager.webhook.alerts()
                    if a["labels"].get("alertname") == STUCK_ALERT
                    and a["labels"].get("model_name") == model and a["status"] == "firing"]

        received = prom.wait_for("webhook received the stuck alert", delivered, timeout=15)
        assert {a["labels"]["engine"] for a in received} == {str(STALLED_RANK)}
        assert received[0]["annotations"]["runbook_url"].endswith("#vllmdpsyncallreducestuck")

        # The on-call engineer's next step: doctor through the same Prometheus names rank 2.
        report = run_doctor(prometheus=prom.url, selector=f'model_name="{model}"')
        assert report.verdict.kind == "stuck", report.render()
        assert report.verdict.culprits == [STALLED_RANK]
        assert report.verdict.victims == [r for r in range(RANKS) if r != STALLED_RANK]
    elapsed = time.monotonic() - started
    # Not asserted (the machine is shared): about 50 s, the alert about 27 s after the stall.
    print(f"stuck alert fired {fired_after:.1f} s after the stall; test took {elapsed:.1f} s")


IDLE_SECONDS = 31  # longer than every threshold of the rules (10 s stuck, 30 s not progressing)


def test_idle_time_and_normal_pauses_fire_nothing_not_even_pending(tmp_path, alertmanager):
    model = "live-normal"
    started = time.monotonic()
    seen: list[dict] = []
    with Cluster(cluster_config(tmp_path, model)) as cluster, \
            prometheus(tmp_path, cluster, alertmanager) as prom:
        ready = time.monotonic()
        run_start = time.time()
        stop = threading.Event()

        def watch():  # /api/v1/alerts every 0.5 s, on top of the ALERTS series below
            while not stop.wait(0.5):
                try:
                    seen.extend(prom.alerts())
                except OSError:
                    pass

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        lp = f'{n.LAST_PROGRESS}{{job="{JOB}"}}'
        try:
            # Idle since start-up, longer than every threshold (no rank progresses), as
            # Prometheus sees it...
            prom.wait_for(f"every rank idle for {IDLE_SECONDS} s", lambda: prom.query(
                f"min(timestamp({lp}) - {lp}) > {IDLE_SECONDS}"), timeout=IDLE_SECONDS + 15)
            # ...then traffic on one rank: the group wakes, its ranks scraped at different
            # instants; then normal keep pauses under traffic.
            assert cluster.generate(60, rank=0).result(30) == "completed"
            for _ in range(3):
                traffic_and_pause(cluster, tokens=60, paused_for=1.0)
            time.sleep(2)  # evaluations after the last resume
        finally:
            stop.set()
            watcher.join(5)
        run_end = time.time()
        window = int(run_end - run_start) + 2

        consensus = f'{n.PAUSE_CONSENSUS}_total{{job="{JOB}"}}'
        pauses = prom.query(f"max_over_time({consensus}[{window}s]) - "
                            f"min_over_time({consensus}[{window}s])", at=run_end)
        assert sorted(float(s["value"][1]) for s in pauses) == [3.0] * RANKS, pauses
        paused = prom.query(f'max_over_time({n.PHASE}{{job="{JOB}"}}[{window}s]) == '
                            f'{n.PHASE_PAUSED}', at=run_end)
        assert len(paused) == RANKS, "Prometheus never saw the ranks paused"
        # This Prometheus has lived less than 10 minutes: its whole history, pending included.
        alerts = prom.query("count_over_time(ALERTS[10m])", at=run_end)
        assert alerts == [], f"alerts during normal pauses / idle: {alerts}"
        assert seen == [], f"/api/v1/alerts listed: {seen}"
        assert prom.alerts() == []
    am_alerts = get_json(f"{alertmanager.url}/api/v2/alerts")
    assert [a for a in am_alerts if a["labels"].get("model_name") == model] == []
    assert [a for a in alertmanager.webhook.alerts()
            if a["labels"].get("model_name") == model] == []
    elapsed = time.monotonic() - started
    # Not asserted (the machine is shared): about 45 s, most of it the 31 s idle period.
    print(f"idle + normal pauses test took {elapsed:.1f} s (cluster + Prometheus up after "
          f"{ready - started:.1f} s)")
