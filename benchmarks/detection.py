"""Section 2: detection latency of a stalled rank on a real DP 4 CPU cluster.

The stall fault makes a rank stop right before its next sync all-reduce while staying alive
(its /metrics still answers); its peers enter the all-reduce and wait. The known moment t0 is
when the stalled rank sets its flag on the cluster's shared-memory status board (polled every
millisecond here). Then we time:
 (a) until the peers' /metrics show all of them inside the sync all-reduce and the stalled
     rank not (a scrape every 20 ms);
 (b) until the doctor (``diagnose`` on ``scrape.to_view`` views, default 2 s threshold) names
     the stalled rank as the culprit;
 (c) until the shipped ``VllmDpSyncAllReduceStuck`` alert fires in a real Prometheus with the
     shipped recording and alert rules, scraping and evaluating every second; the theoretical
     bound is the rule's 10 s threshold + its ``for: 15s`` + one scrape + one evaluation.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

from benchmarks.common import emit, log, start_clusters, stop_clusters, tempdir

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "otel-config" / "rules"
ALERT = "VllmDpSyncAllReduceStuck"
ALERT_THRESHOLD_S = 10.0
ALERT_FOR_S = 15.0
SCRAPE_S = 1.0
EVAL_S = 1.0
DOCTOR_THRESHOLD_S = 2.0
STALLED_RANK = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str, timeout: float = 2.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


class Prometheus:
    """A real Prometheus on loopback with the shipped rules and 1 s scrape/evaluation."""

    def __init__(self, targets: list[str], binary: str) -> None:
        self.dir = Path(tempdir(prefix="bench-prom-"))
        shutil.copy(RULES / "recording.yml", self.dir / "recording.yml")
        shutil.copy(RULES / "alerts.yml", self.dir / "alerts.yml")
        hostports = [t.split("//", 1)[-1].split("/", 1)[0] for t in targets]
        config = {
            "global": {"scrape_interval": f"{SCRAPE_S:g}s", "scrape_timeout": "900ms",
                       "evaluation_interval": f"{EVAL_S:g}s"},
            "rule_files": ["recording.yml", "alerts.yml"],
            "scrape_configs": [{"job_name": "vllm-dp",
                                "static_configs": [{"targets": hostports}]}],
        }
        (self.dir / "prometheus.yml").write_text(json.dumps(config))  # JSON is valid YAML
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(self.dir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={self.dir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=self.dir)

    def wait_ready(self, targets: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: see {self.dir / 'prometheus.log'}")
            try:
                body = _get_json(self.url + "/api/v1/query?query=count(up%3D%3D1)")
                result = body["data"]["result"]
                if result and int(float(result[0]["value"][1])) == targets:
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.2)
        raise RuntimeError(f"prometheus did not scrape {targets} targets in {timeout} s")

    def alert_state(self, engine: int) -> str | None:
        body = _get_json(self.url + "/api/v1/alerts")
        for a in body["data"]["alerts"]:
            if a["labels"].get("alertname") == ALERT and a["labels"].get("engine") == str(engine):
                return a["state"]
        return None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _doctor_verdict(urls: list[str], threshold: float):
    """What ``instrumented-core doctor`` does: scrape every rank, views, diagnose."""
    from instrumented_core.diagnosis import diagnose
    from instrumented_core.scrape import scrape_all, to_view

    samples = scrape_all(urls, timeout=1.0)
    return diagnose([to_view(s, r) for r, s in enumerate(samples)], threshold)


def run(quick: bool, with_alert: bool) -> None:
    from benchmarks.overhead import telemetry_on
    from instrumented_core.cluster import ClusterConfig
    from instrumented_core.scrape import scrape_all
    from instrumented_core.telemetry import names as n

    binary = shutil.which("prometheus") or ("/usr/bin/prometheus"
                                             if os.path.exists("/usr/bin/prometheus") else None)
    if with_alert and binary is None:
        log("detection: prometheus not found; skipping the alert measurement")
        with_alert = False
    tmp = tempdir(prefix="bench-detect-")
    cfg = ClusterConfig(ranks=4, hang_timeout=120.0, collective_timeout=300.0,
                        telemetry=telemetry_on(tmp))
    log(f"detection: DP 4 cluster{' + Prometheus' if with_alert else ''}")
    (cluster,) = start_clusters([cfg])
    prom = None
    try:
        urls = cluster.metrics_urls
        handles = [cluster.generate(10_000_000, rank=r) for r in range(4)]  # keep stepping
        if with_alert:
            prom = Prometheus(urls, binary)
            prom.wait_ready(4)
            time.sleep(2 * SCRAPE_S)  # a few samples of the healthy, stepping cluster
        else:
            time.sleep(0.5)
        assert prom is None or prom.alert_state(STALLED_RANK) is None, "alert before the stall"

        stall_at: list[float] = []
        stop = threading.Event()

        def watch_board() -> None:
            while not stop.is_set():
                if cluster.board.read(STALLED_RANK).stalled:
                    stall_at.append(time.time())
                    return
                time.sleep(0.001)

        watcher = threading.Thread(target=watch_board, daemon=True)
        watcher.start()
        injected = time.time()
        cluster.inject_fault(STALLED_RANK, "stall")
        watcher.join(10)
        stop.set()
        if not stall_at:
            raise RuntimeError("the stall fault did not take effect within 10 s")
        t0 = stall_at[0]
        peers = [r for r in range(4) if r != STALLED_RANK]

        # the doctor command's own entry point, invoked back to back from another thread
        from benchmarks.scale import load_run_doctor

        run_doctor = load_run_doctor()
        doctor_done: list[tuple[float, object]] = []

        def doctor_loop() -> None:
            while not stop_doctor.is_set() and time.time() < t0 + 20:
                report = run_doctor(urls, threshold=DOCTOR_THRESHOLD_S)
                v = report.verdict
                if v.kind == "stuck" and v.culprits == [STALLED_RANK]:
                    doctor_done.append((time.time(), v))
                    return

        stop_doctor = threading.Event()
        doctor_thread = None
        if run_doctor is not None:
            doctor_thread = threading.Thread(target=doctor_loop, daemon=True)
            doctor_thread.start()

        t_metrics = t_doctor = t_pending = t_firing = None
        verdict = None
        deadline = t0 + (ALERT_THRESHOLD_S + ALERT_FOR_S + 20 if with_alert else 15)
        next_doctor = next_prom = 0.0
        while time.time() < deadline:
            now = time.time()
            if t_metrics is None:
                samples = scrape_all(urls, timeout=1.0)
                inside = [(s.get(n.COLLECTIVE_INSIDE, 0.0, collective=n.COLLECTIVE_SYNC) or 0)
                          for s in samples]
                if all(inside[r] > 0 for r in peers) and inside[STALLED_RANK] == 0:
                    t_metrics = time.time()
            if t_doctor is None and now >= next_doctor:
                next_doctor = now + 0.1
                v = _doctor_verdict(urls, DOCTOR_THRESHOLD_S)
                if v.kind == "stuck" and v.culprits == [STALLED_RANK]:
                    t_doctor, verdict = time.time(), v
            if prom is not None and t_firing is None and now >= next_prom:
                next_prom = now + 0.1
                state = prom.alert_state(STALLED_RANK)
                if state == "pending" and t_pending is None:
                    t_pending = time.time()
                if state == "firing":
                    t_firing = time.time()
            if t_metrics and t_doctor and (prom is None or t_firing):
                break
            time.sleep(0.02)
        if doctor_thread is not None:
            doctor_thread.join(max(0.0, t0 + 21 - time.time()))
            stop_doctor.set()
        for h in handles:
            h.future.cancel()
    finally:
        if prom is not None:
            prom.close()
        stop_clusters([cluster])

    def since(t):
        return None if t is None else t - t0

    emit("detection.peers_metrics_show_sync_wait", "s", value=since(t_metrics),
         poll_interval_s=0.02, stall_effective_after_inject_s=t0 - injected,
         note="t0 = stalled rank's flag on the status board; first 20 ms scrape of all 4 "
              "ranks where the 3 peers are inside sync_dp_state and the stalled rank is not")
    if doctor_done:
        t_run, v = doctor_done[0]
        emit("detection.run_doctor_names_stalled_rank", "s", value=since(t_run),
             threshold_s=DOCTOR_THRESHOLD_S, culprits=v.culprits,
             note="instrumented_core.doctor.run_doctor(targets) called back to back (two "
                  "scrapes 0.5 s apart each); time when the first report naming the rank "
                  "returned")
    elif run_doctor is not None:
        emit("detection.run_doctor_names_stalled_rank", "s", value=None,
             note="run_doctor did not name the stalled rank within 20 s")
    emit("detection.diagnose_names_stalled_rank", "s", value=since(t_doctor),
         threshold_s=DOCTOR_THRESHOLD_S, poll_interval_s=0.1,
         culprits=verdict.culprits if verdict else None,
         summary=verdict.summary if verdict else None,
         note="diagnose(to_view(scrape_all)) polled every 100 ms, default 2 s threshold "
              "(what the doctor computes, one scrape)")
    if with_alert:
        simple = ALERT_THRESHOLD_S + ALERT_FOR_S + SCRAPE_S + EVAL_S
        bound = simple + EVAL_S  # the alert reads a recording rule of another rule group
        emit("detection.alert_fires", "s", baseline=bound, instrumented=since(t_firing),
             bound_threshold_for_scrape_eval_s=simple,
             pending_after_s=since(t_pending), threshold_s=ALERT_THRESHOLD_S,
             for_s=ALERT_FOR_S, scrape_interval_s=SCRAPE_S, eval_interval_s=EVAL_S,
             alert=ALERT, goal="fires within threshold + for + scrape + eval",
             goal_met=t_firing is not None and since(t_firing) <= bound + 0.5,
             note="real Prometheus, shipped recording.yml + alerts.yml, 1 s scrape and "
                  "evaluation; baseline = theoretical bound: 10 s threshold + 15 s for + 1 "
                  "scrape + 1 evaluation of the recording rule group + 1 of the alert group; "
                  "alert state polled every 100 ms")
