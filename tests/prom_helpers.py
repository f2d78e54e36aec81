"""A real Prometheus for tests: the Debian binary on loopback, the shipped rules, bounded waits.

``running_prometheus(targets, tmp)`` starts ``prometheus`` on a free 127.0.0.1 port with its
storage in ``tmp``, scraping the given ``host:port`` targets (one per DP rank) as job
``vllm-dp`` and evaluating the shipped ``otel-config/rules/*.yml`` unchanged, every second by
default. The config is derived from ``otel-config/prometheus.yml``: only the targets, the
intervals, the rule file paths and (optionally) the Alertmanager change. It yields once every
target has been scraped twice (rates need two samples) and ends the process on exit, even when
the body or the start-up fails. Every wait is bounded and reports what it saw last.

    from tests.prom_helpers import running_prometheus

    with running_prometheus(["127.0.0.1:8100", "127.0.0.1:8101"], tmp_path) as prom:
        ...  # freeze a worker
        [labels] = prom.wait_for_alert("VllmDpRankWedged", timeout=60)
        assert labels["engine"] == "1"
        prom.query('vllm_dp_requests_running{job="vllm-dp"}')

    with running_prometheus(urls, tmp_path) as prom:
        ...  # idle for longer than every threshold
        prom.assert_no_alerts()  # nothing firing or pending, now or since it started

A missing binary fails the test (``conftest.require_tool``), never skips it.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from instrumented_core.cluster.client import free_port
from tests.helpers import require_tool

__all__ = ["JOB", "OTEL", "Prometheus", "Server", "get_json", "prometheus_config",
           "running_prometheus", "target"]

ROOT = Path(__file__).resolve().parents[1]
OTEL = ROOT / "otel-config"
JOB = "vllm-dp"  # the ranks' scrape job in otel-config/prometheus.yml


def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def target(url_or_hostport: str) -> str:
    """``http://127.0.0.1:8100/metrics`` or ``127.0.0.1:8100`` -> ``127.0.0.1:8100``."""
    if "://" not in url_or_hostport:
        return url_or_hostport
    parsed = urllib.parse.urlparse(url_or_hostport)
    assert parsed.path in ("", "/", "/metrics"), f"not a /metrics endpoint: {url_or_hostport}"
    return parsed.netloc


class Server:
    """A binary started on a free loopback port, its output in a log file; ``stop`` ends it."""

    def __init__(self, name: str, argv: list[str], url: str, log: Path) -> None:
        self.name, self.url, self.log = name, url, log
        self._log_file = log.open("wb")
        try:
            self.proc = subprocess.Popen(argv, stdout=self._log_file, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        except BaseException:
            self._log_file.close()
            raise

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
        if not self._log_file.closed:
            self._log_file.flush()
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """Terminate, then kill after 10 s; idempotent."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if not self._log_file.closed:
            self._log_file.close()


class Prometheus(Server):
    """A running Prometheus: instant queries, its alerts, bounded waits on both."""

    def __init__(self, *args, job: str = JOB, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.job = job
        self.started_at = time.time()

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """The instant vector (``/api/v1/query`` result list); a bad query fails the test."""
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

    def alerts(self, name: str | None = None) -> list[dict]:
        """Pending and firing alerts, as ``/api/v1/alerts`` lists them (``name``: only those)."""
        alerts = get_json(f"{self.url}/api/v1/alerts")["data"]["alerts"]
        return [a for a in alerts if name is None or a["labels"].get("alertname") == name]

    def wait_for(self, what: str, condition: Callable[[], Any], timeout: float,
                 poll: float = 0.5) -> Any:
        """``condition()``'s first truthy result; fails after ``timeout`` s with the log tail."""
        deadline = time.monotonic() + timeout
        while True:
            result = condition()
            if result:
                return result
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not within {timeout} s\n{self.tail(10)}")
            time.sleep(poll)

    def wait_targets_up(self, count: int, timeout: float = 30.0) -> None:
        """Until ``count`` targets of the job are up and each was scraped at least twice."""
        up = f'up{{job="{self.job}"}}'
        self.wait_for(f"{count} {self.job} targets up", lambda: len(self.query(
            f"count_over_time({up}[1m]) >= 2 and {up} == 1")) == count, timeout=timeout)

    def wait_for_alert(self, name: str, timeout: float,
                       labels: Mapping[str, str] | None = None) -> list[dict[str, str]]:
        """Until alert ``name`` fires (with ``labels``, when given); the labels of every firing
        instance, sorted by ``engine``. Failing, it reports the alerts seen last (pending
        included), so a wrong rank or an alert stuck in pending is visible."""
        want = dict(labels or {})
        seen: list[dict] = []

        def firing() -> list[dict[str, str]]:
            seen[:] = self.alerts()
            return sorted((a["labels"] for a in seen
                           if a["labels"].get("alertname") == name and a["state"] == "firing"
                           and all(a["labels"].get(k) == v for k, v in want.items())),
                          key=lambda lab: (lab.get("engine", ""), sorted(lab.items())))

        deadline = time.monotonic() + timeout
        while True:
            result = firing()
            if result:
                return result
            if time.monotonic() > deadline:
                brief = [(a["labels"].get("alertname"), a["state"],
                          {k: v for k, v in a["labels"].items() if k != "alertname"})
                         for a in seen]
                pytest.fail(f"{name} {want or ''} not firing within {timeout} s; alerts seen "
                            f"last: {brief}\n{self.tail(10)}")
            time.sleep(0.5)

    def assert_no_alerts(self, names: Iterable[str] | None = None,
                         since: float | None = None) -> None:
        """No alert (of ``names``, default all) is firing or pending now, nor was one at any
        evaluation since ``since`` (Unix time; default: since this Prometheus started), read
        from its ``ALERTS`` series, which holds pending alerts too."""
        wanted = set(names) if names is not None else None
        current = [a for a in self.alerts()
                   if wanted is None or a["labels"].get("alertname") in wanted]
        assert current == [], f"alerts pending or firing: {current}"
        start = self.started_at if since is None else since
        window = max(1, math.ceil(time.time() - start) + 1)
        selector = "ALERTS" if wanted is None else (
            'ALERTS{alertname=~"' + "|".join(sorted(wanted)) + '"}')
        history = self.query(f"count_over_time({selector}[{window}s])")
        assert history == [], f"alerts pending or firing in the last {window} s: {history}"


def prometheus_config(targets: Sequence[str], interval: str = "1s", job: str = JOB,
                      alertmanager: str | None = None) -> dict:
    """The shipped ``otel-config/prometheus.yml`` with ``targets`` (host:port) as the ranks'
    job, ``interval`` for scrapes, their timeout and rule evaluation, the shipped rule files by
    absolute path, and ``alertmanager`` (host:port) or none. Other jobs are dropped (no
    collector runs in tests: its target would only be down)."""
    config = yaml.safe_load((OTEL / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=interval, scrape_timeout=interval,
                            evaluation_interval=interval)
    config["rule_files"] = [str((OTEL / f).resolve()) for f in config["rule_files"]]
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert job in jobs, f"otel-config/prometheus.yml has no {job!r} job"
    ranks = jobs[job]
    ranks["static_configs"] = [{"targets": [target(t) for t in targets]}]
    config["scrape_configs"] = [ranks]
    if alertmanager is None:
        config.pop("alerting", None)
    else:
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
    return config


@contextmanager
def running_prometheus(targets: Sequence[str], tmp: Path, *, interval: str = "1s",
                       job: str = JOB, alertmanager: str | None = None,
                       wait_up: bool = True, ready_timeout: float = 30.0,
                       extra_args: Sequence[str] = ()) -> Iterator[Prometheus]:
    """A Prometheus scraping ``targets`` (``host:port`` or ``http://host:port/metrics``) with
    the shipped rules; files in ``tmp`` (config, TSDB, ``prometheus.log``). With ``wait_up``
    it yields once every target was scraped twice; the process is ended on exit.
    ``extra_args``: more flags, e.g. ``--enable-feature=exemplar-storage``."""
    binary = require_tool("prometheus")
    tmp.mkdir(parents=True, exist_ok=True)
    config = prometheus_config(targets, interval=interval, job=job, alertmanager=alertmanager)
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    server = Prometheus("prometheus", [
        binary, f"--config.file={tmp / 'prometheus.yml'}",
        f"--web.listen-address=127.0.0.1:{port}", f"--storage.tsdb.path={tmp / 'data'}",
        "--log.level=warn", *extra_args,
    ], f"http://127.0.0.1:{port}", tmp / "prometheus.log", job=job)
    try:
        server.wait_ready("/-/ready", timeout=ready_timeout)
        if wait_up:
            server.wait_targets_up(len(targets), timeout=ready_timeout)
        yield server
    finally:
        server.stop()
