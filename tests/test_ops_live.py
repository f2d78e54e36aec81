"""The ops bundle, live: a real Prometheus and Alertmanager against a real CPU cluster.

Each test starts its own DP 4 cluster (metrics on free loopback ports) and its own Prometheus
(``prom_helpers.running_prometheus``: fresh storage, so one test's series and alerts never leak
into the other's assertions); the module shares one Alertmanager and the webhook receiver it
delivers to. Both configs are derived from the shipped ones (``otel-config/prometheus.yml``,
``otel-config/alertmanager.yml``): only the targets, ports and intervals change, the rule files
are the shipped ones unchanged. Every process is ended in ``finally``; every wait is bounded; a
missing binary fails the test.

- a stalled rank: every dashboard panel query returns data (the worker panels wherever the
  cluster publishes worker series), ``VllmDpSyncAllReduceStuck`` fires with the stalled rank's
  ``engine`` label and the Alertmanager delivers it to the webhook; the group, holding a
  request and progressing nowhere, also fires ``VllmDpGroupWedged`` with its labels;
- an idle period longer than every threshold, the wake-up after it (ranks scraped at different
  instants) and normal keep pauses under traffic: no alert, not even a pending one.
"""

from __future__ import annotations

import json
import random
import threading
import time
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
from tests.helpers import require_tool
from tests.prom_helpers import JOB, OTEL, Server, get_json, running_prometheus, target

pytestmark = [pytest.mark.prometheus, pytest.mark.cluster]

STUCK_ALERT = "VllmDpSyncAllReduceStuck"
GROUP_ALERT = "VllmDpGroupWedged"
RANK_ALERT = "VllmDpRankWedged"
STALLED_RANK = 2
RANKS = 4
INTERVAL = "1s"  # scrape and rule evaluation


# --- the Alertmanager webhook ----------------------------------------------------------------


class Webhook:
    """The Alertmanager webhook receiver: keeps every JSON payload POSTed to it."""

    def __init__(self) -> None:
        self.payloads: list[dict] = []
        self._lock = threading.Lock()
        received = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
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


# --- configs derived from the shipped ones ---------------------------------------------------


def alertmanager_config(webhook_url: str) -> dict:
    config = yaml.safe_load((OTEL / "alertmanager.yml").read_text())
    hooks = [w for r in config["receivers"] for w in r.get("webhook_configs", [])]
    assert hooks, "otel-config/alertmanager.yml has no webhook receiver"
    for hook in hooks:
        hook["url"] = webhook_url
    return config


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
    """The shipped rules scraping this cluster's ranks, alerting to this Alertmanager."""
    with running_prometheus(cluster.metrics_urls, tmp, interval=INTERVAL,
                            alertmanager=alertmanager.url.removeprefix("http://")) as server:
        # Every rank scraped (twice: rates need two), each with its own engine label.
        engines = {s["metric"]["engine"]: s["metric"]["instance"]
                   for s in server.query(f'{n.PHASE}{{job="{JOB}"}}')}
        assert engines == {str(r): target(u) for r, u in enumerate(cluster.metrics_urls)}
        yield server


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

        # The group holds a request (rank 0) and no rank progresses: the group alert fires
        # too, with the group's labels only (no single culprit), the busy rank listed.
        [group] = prom.wait_for_alert(GROUP_ALERT, timeout=20, labels={"model_name": model})
        assert group == {"alertname": GROUP_ALERT, "severity": "critical", "job": JOB,
                         "model_name": model}
        [group_alert] = prom.alerts(GROUP_ALERT)
        assert "engine 0: 1" in group_alert["annotations"]["description"], group_alert

        # Every panel query, with the variables filled in, returns data now. The rate window
        # covers the pause and the traffic before the stall. The worker panels need worker
        # series, which only a cluster with workers on the worker board publishes.
        now = time.time()
        workers = bool(prom.query(f'{n.WORKER_HEARTBEAT_AGE}{{job="{JOB}"}}', at=now))
        empty, without_workers = [], []
        panels = 0
        for name, queries in expanded_queries(model, rate_interval="2m").items():
            for title, expr in queries:
                panels += 1
                if not prom.query(expr, at=now):
                    reads_workers = "vllm_dp_worker_" in expr
                    (without_workers if reads_workers and not workers else empty).append(
                        f"{name}: {title!r}: {expr}")
        assert panels >= 19
        assert not empty, "panel queries without data:\n" + "\n".join(empty)
        assert len(without_workers) <= 2, without_workers
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
    print(f"stuck alert fired {fired_after:.1f} s after the stall; worker series: {workers}; "
          f"test took {elapsed:.1f} s")


def test_a_rank_whose_worker_stalls_inside_the_forward_is_named_by_the_rank_wedged_alert(
        tmp_path, alertmanager):
    """Issue 17 on the cluster's engine/worker split: one rank's worker stops inside the
    forward before the model collective; its engine core waits in step, its peers' workers
    wait in the collective. Nobody is inside a cross-rank collective, so only the new alerts
    can name it."""
    model = "live-worker-stall"
    rank = random.randrange(RANKS)
    started = time.monotonic()
    with Cluster(cluster_config(tmp_path, model)) as cluster, \
            prometheus(tmp_path, cluster, alertmanager) as prom:
        for r in range(RANKS):
            cluster.generate(100_000, rank=r)  # in flight until the end of the test
        time.sleep(1.0)
        cluster.inject_fault(rank, "worker_stall")
        stalled_at = time.monotonic()
        # 10 s inside step + for: 15s + scrape / evaluation delays.
        [labels] = prom.wait_for_alert(RANK_ALERT, timeout=45, labels={"model_name": model})
        fired_after = time.monotonic() - stalled_at
        assert labels == {"alertname": RANK_ALERT, "severity": "critical", "job": JOB,
                          "model_name": model, "engine": str(rank),
                          "instance": target(cluster.metrics_urls[rank])}
        [alert] = prom.alerts(RANK_ALERT)
        description = alert["annotations"]["description"]
        assert description.startswith(f"Rank {rank} of {model} (job {JOB}) is wedged inside "
                                      "step"), description
        assert "Peers' workers wait in a model collective" in description, description
        assert f"Rank {rank} is the culprit" in description
        # The group holds work on every rank and progresses nowhere.
        [group] = prom.wait_for_alert(GROUP_ALERT, timeout=20, labels={"model_name": model})
        assert set(group) == {"alertname", "severity", "job", "model_name"}
        # Only the wedged rank is named, and the sync all-reduce alert has no part in it.
        assert [a["labels"]["engine"] for a in prom.alerts(RANK_ALERT)] == [str(rank)]
        assert prom.alerts(STUCK_ALERT) == []
    elapsed = time.monotonic() - started
    # Not asserted (the machine is shared): about 25-30 s after the stall.
    print(f"rank {rank}'s worker stalled: {RANK_ALERT} fired {fired_after:.1f} s later; test "
          f"took {elapsed:.1f} s\n  {description}")


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
        # Its whole history (ALERTS, pending included) and now: nothing.
        prom.assert_no_alerts()
        assert seen == [], f"/api/v1/alerts listed: {seen}"
    am_alerts = get_json(f"{alertmanager.url}/api/v2/alerts")
    assert [a for a in am_alerts if a["labels"].get("model_name") == model] == []
    assert [a for a in alertmanager.webhook.alerts()
            if a["labels"].get("model_name") == model] == []
    elapsed = time.monotonic() - started
    # Not asserted (the machine is shared): about 45 s, most of it the 31 s idle period.
    print(f"idle + normal pauses test took {elapsed:.1f} s (cluster + Prometheus up after "
          f"{ready - started:.1f} s)")


def test_peers_stalled_on_an_unreachable_rank_inhibits_the_wedged_and_stuck_alerts_of_its_group(
        alertmanager):
    """The shipped inhibit rule in a real Alertmanager: while VllmDpPeersStalledOnUnreachableRank
    fires for a group, that group's wedged/stuck/slow alerts (its consequences) are suppressed
    and never reach the webhook; another group's, and the warning naming the rank, are not."""
    import datetime
    import urllib.request

    model, other = "live-unreachable", "live-unreachable-other"

    def alert(name: str, severity: str = "critical", model_name: str = model, **labels: str):
        return {"alertname": name, "severity": severity, "job": JOB, "model_name": model_name,
                **labels}

    source = alert("VllmDpPeersStalledOnUnreachableRank", engine="1", instance="b:8101")
    inhibited = [alert(GROUP_ALERT), alert(RANK_ALERT, engine="0"),
                 alert(STUCK_ALERT, engine="1"), alert("VllmDpRankNotProgressing", engine="0"),
                 alert("VllmDpPauseConsensusSlow", "warning", engine="0")]
    kept = [alert(GROUP_ALERT, model_name=other),
            alert("VllmDpRankUnreachable", "warning", engine="1", instance="b:8101")]

    started = datetime.datetime.now(datetime.timezone.utc)

    def post(labels: list[dict], ends: datetime.datetime) -> None:
        body = json.dumps([{"labels": la, "annotations": {}, "startsAt": started.isoformat(),
                            "endsAt": ends.isoformat()} for la in labels]).encode()
        request = urllib.request.Request(f"{alertmanager.url}/api/v2/alerts", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert resp.status == 200

    def wait(what: str, condition, timeout: float = 20.0):
        deadline = time.monotonic() + timeout
        while not (result := condition()):
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not within {timeout} s\n{alertmanager.tail(10)}")
            time.sleep(0.2)
        return result

    def status() -> dict[tuple, dict]:
        return {tuple(sorted(a["labels"].items())): a["status"]
                for a in get_json(f"{alertmanager.url}/api/v2/alerts")
                if a["labels"].get("model_name") in (model, other)}

    def delivered(labels: dict) -> bool:
        return any(a["labels"] == labels for a in alertmanager.webhook.alerts())

    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=5)
    try:
        post([source], later)  # the cause fires first (as its `for:` elapses)
        wait("the peers-stalled alert delivered", lambda: delivered(source))
        post(inhibited + kept, later)
        key = lambda labels: tuple(sorted(labels.items()))  # noqa: E731
        states = wait("every consequence suppressed by the source", lambda: (
            (s := status()) and all(s.get(key(la), {}).get("inhibitedBy") for la in inhibited)
            and all(key(la) in s for la in kept) and s))
        for labels in inhibited:
            assert states[key(labels)]["state"] == "suppressed", labels
        for labels in kept:
            assert states[key(labels)]["state"] == "active", labels
            assert not states[key(labels)]["inhibitedBy"], labels
        # The other group's critical alert goes out at once (group_wait 0s for critical); the
        # consequences, routed the same way, never do.
        wait("the other group's wedged alert delivered", lambda: delivered(kept[0]))
        assert not [la for la in inhibited if delivered(la)]
    finally:
        post([source, *inhibited, *kept], datetime.datetime.now(datetime.timezone.utc))
