"""Reading ranks' ``/metrics`` (or a Prometheus server) into per-rank views.

Used by the doctor, the demo's live view and the tests, so they read the same series the same
way Prometheus would, over HTTP, never from Python objects inside the ranks.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from instrumented_core.diagnosis import RankView
from instrumented_core.telemetry import names as n

PHASE_NAMES = {code: name for name, code in n.PHASE_CODES.items()}
WAIT_COLLECTIVES = ("step", n.COLLECTIVE_SYNC)

#: The series :func:`to_view` reads (and ``RankSample.engine``): what the doctor scrapes.
#: About a sixth of a rank's exposition; the rest (histogram buckets, ``_created``) is skipped
#: before parsing, which is most of a scrape's client-side cost at 64+ ranks.
DIAGNOSIS_SERIES = frozenset({
    n.PHASE, n.ENGINES_RUNNING, n.STEPS_UNTIL_SYNC, n.DP_SIZE, n.COLLECTIVE_INSIDE,
    n.LAST_PROGRESS, n.COLLECTIVE_WAIT_TOTAL, n.REQUESTS_RUNNING, n.REQUESTS_WAITING,
    n.WORKER_CALL_INSIDE, n.WORKER_MODEL_COLLECTIVE_INSIDE, n.WORKER_HEARTBEAT_AGE,
    n.WORKER_MODEL_COLLECTIVES_TOTAL, n.WORKER_MODEL_COLLECTIVE_SECONDS_TOTAL,
    n.WORKER_POSITION_INFO,
})


@dataclass
class RankSample:
    target: str
    reachable: bool
    error: str = ""
    fetched_at: float = 0.0
    values: dict[tuple[str, frozenset], float] = field(default_factory=dict)

    def get(self, name: str, default: float | None = None, **labels: str) -> float | None:
        """The one series ``name`` whose labels include ``labels`` (engine/model ignored)."""
        want = set(labels.items())
        for (series, label_set), value in self.values.items():
            if series == name and want <= label_set:
                return value
        return default

    def by_label(self, name: str, label: str) -> dict[str, float]:
        """``{label value: value}`` of every series ``name`` (e.g. per worker)."""
        out: dict[str, float] = {}
        for (series, label_set), value in self.values.items():
            if series == name:
                key = dict(label_set).get(label)
                if key is not None:
                    out[key] = value
        return out

    def labels_of(self, name: str, label: str) -> dict[str, dict[str, str]]:
        """``{label value: all labels}`` of every series ``name`` (info metrics)."""
        out: dict[str, dict[str, str]] = {}
        for (series, label_set) in self.values:
            if series == name:
                labels = dict(label_set)
                if label in labels:
                    out[labels[label]] = labels
        return out

    def sum(self, name: str, **labels: str) -> float:
        want = set(labels.items())
        return sum(v for (s, ls), v in self.values.items() if s == name and want <= ls)

    @property
    def engine(self) -> int | None:
        for (series, label_set) in self.values:
            if series == n.DP_SIZE:
                return int(dict(label_set)[n.LABEL_ENGINE])
        return None


def metrics_url(target: str) -> str:
    if target.startswith("http://") or target.startswith("https://"):
        return target if target.rstrip("/").endswith("/metrics") else target.rstrip("/") + "/metrics"
    return f"http://{target}/metrics"


def _only_series(text: str, names: Collection[str]) -> str:
    """The sample lines of ``text`` whose series name is in ``names`` (comments dropped)."""
    keep = [line for line in text.splitlines()
            if line and line[0] != "#" and line.split("{", 1)[0].split(" ", 1)[0] in names]
    return "\n".join(keep) + "\n"


def scrape(target: str, timeout: float = 1.0,
           only: Collection[str] | None = None) -> RankSample:
    """One rank's ``/metrics``; ``only`` keeps just those series (e.g. ``DIAGNOSIS_SERIES``)."""
    url = metrics_url(target)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode()
    except Exception as e:  # noqa: BLE001 - unreachable is a finding, not a crash
        return RankSample(target, False, f"{type(e).__name__}: {e}", time.time())
    sample = RankSample(target, True, fetched_at=time.time())
    if only is not None:
        text = _only_series(text, only)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            sample.values[(s.name, frozenset(s.labels.items()))] = s.value
    return sample


def scrape_all(targets: list[str], timeout: float = 1.0,
               only: Collection[str] | None = None) -> list[RankSample]:
    if not targets:
        return []
    with ThreadPoolExecutor(max_workers=min(32, len(targets))) as pool:
        return list(pool.map(lambda t: scrape(t, timeout, only), targets))


def to_view(sample: RankSample, rank: int, previous: RankSample | None = None) -> RankView:
    """One rank's diagnosis input; with ``previous`` it also gets its collective wait share."""
    if not sample.reachable:
        return RankView(rank=rank, reachable=False)
    inside = {c: sample.get(n.COLLECTIVE_INSIDE, 0.0, collective=c) or 0.0 for c in n.COLLECTIVES}
    collective, seconds = max(inside.items(), key=lambda kv: kv[1])
    last_progress = sample.get(n.LAST_PROGRESS, 0.0) or 0.0
    wait_fraction = None
    if previous is not None and previous.reachable:
        elapsed = sample.fetched_at - previous.fetched_at
        waited = sum((sample.get(n.COLLECTIVE_WAIT_TOTAL, 0.0, collective=c) or 0.0) -
                     (previous.get(n.COLLECTIVE_WAIT_TOTAL, 0.0, collective=c) or 0.0)
                     for c in WAIT_COLLECTIVES)
        # a rank sitting inside a collective right now has not banked that wait yet
        waited += min(seconds, elapsed) if collective in WAIT_COLLECTIVES else 0.0
        if elapsed > 0:
            wait_fraction = max(0.0, min(1.0, waited / elapsed))
    until = sample.get(n.STEPS_UNTIL_SYNC)
    running, waiting = sample.get(n.REQUESTS_RUNNING), sample.get(n.REQUESTS_WAITING)
    requests = (int(running + waiting) if running is not None and waiting is not None
                and running == running and waiting == waiting else None)  # NaN: unknown
    return RankView(
        rank=rank,
        reachable=True,
        phase=PHASE_NAMES.get(int(sample.get(n.PHASE, 0) or 0), "running"),
        collective=collective if seconds > 0 else None,
        inside_seconds=seconds,
        progress_age=max(0.0, sample.fetched_at - last_progress) if last_progress else 0.0,
        engines_running=bool(sample.get(n.ENGINES_RUNNING, 0)),
        wait_fraction=wait_fraction,
        steps_until_sync=int(until) if until is not None else None,
        requests=requests,
        **_worker_fields(sample, previous),
    )


def _worker_fields(sample: RankSample, previous: RankSample | None) -> dict:
    """The rank's workers, from the worker-board series of its endpoint (none: no fields)."""
    call_inside = sample.by_label(n.WORKER_CALL_INSIDE, n.LABEL_WORKER)
    if not call_inside:
        return {}
    coll_inside = sample.by_label(n.WORKER_MODEL_COLLECTIVE_INSIDE, n.LABEL_WORKER)
    seqs = sample.by_label(n.WORKER_MODEL_COLLECTIVES_TOTAL, n.LABEL_WORKER)
    heartbeat = sample.by_label(n.WORKER_HEARTBEAT_AGE, n.LABEL_WORKER)
    position = sample.labels_of(n.WORKER_POSITION_INFO, n.LABEL_WORKER)
    workers = sorted(call_inside)
    longest = max(workers, key=lambda w: call_inside[w])
    call = position.get(longest, {}).get(n.LABEL_CALL, "none")
    fields: dict = {
        "workers": len(workers),
        "worker_call": call if call != "none" and call_inside[longest] > 0 else None,
        "worker_call_seconds": call_inside[longest],
        "worker_heartbeat_age": max(heartbeat.get(w, 0.0) for w in workers),
        "model_collective_seq": int(min(seqs.get(w, 0.0) for w in workers)),
    }
    if all(coll_inside.get(w, 0.0) > 0 for w in workers):
        first = min(workers, key=lambda w: coll_inside[w])
        fields["model_collective"] = position.get(first, {}).get(n.LABEL_COLLECTIVE) or "?"
        fields["model_collective_seconds"] = coll_inside[first]
    if previous is not None and previous.reachable:
        before_seqs = previous.by_label(n.WORKER_MODEL_COLLECTIVES_TOTAL, n.LABEL_WORKER)
        if before_seqs:
            fields["model_collectives_advanced"] = int(min(
                seqs.get(w, 0.0) - before_seqs.get(w, 0.0) for w in workers))
        elapsed = sample.fetched_at - previous.fetched_at
        name = n.WORKER_MODEL_COLLECTIVE_SECONDS_TOTAL
        now, before = sample.by_label(name, n.LABEL_WORKER), previous.by_label(name, n.LABEL_WORKER)
        if elapsed > 0 and before:
            shares = []
            for w in workers:
                waited = now.get(w, 0.0) - before.get(w, 0.0)
                # waiting right now has not been banked yet
                waited += min(coll_inside.get(w, 0.0), elapsed)
                shares.append(max(0.0, min(1.0, waited / elapsed)))
            fields["model_wait_fraction"] = max(shares)
    return fields


def prometheus_samples(base_url: str, timeout: float = 2.0,
                       selector: str = "") -> list[RankSample]:
    """Per-engine samples built from a Prometheus server's latest values (instant queries).

    ``up == 0`` targets become unreachable ranks, so a dead rank is still named."""
    by_engine: dict[str, RankSample] = {}
    now = time.time()

    def query(expr: str) -> list[dict]:
        url = base_url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = json.load(response)
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus query failed: {body.get('error')}")
        return body["data"]["result"]

    sel = f"{{{selector}}}" if selector else ""
    expr = "{__name__=~\"vllm_dp_.*\"" + (f",{selector}" if selector else "") + "}"
    for item in query(expr):
        labels = dict(item["metric"])
        engine = labels.get(n.LABEL_ENGINE)
        if engine is None:
            continue
        name = labels.pop("__name__")
        for drop in ("instance", "job"):
            labels.pop(drop, None)
        sample = by_engine.setdefault(engine, RankSample(f"engine {engine}", True, fetched_at=now))
        sample.values[(name, frozenset(labels.items()))] = float(item["value"][1])
    # a dead rank has no fresh series; name it from the engine its target last exported
    engine_of_instance = {
        item["metric"].get("instance"): item["metric"].get(n.LABEL_ENGINE)
        for item in query(f"last_over_time({n.DP_SIZE}{sel}[1h])")}
    for item in query(f"up{sel} == 0"):
        engine = item["metric"].get(n.LABEL_ENGINE) or engine_of_instance.get(
            item["metric"].get("instance"))
        if engine is not None:
            by_engine[engine] = RankSample(f"engine {engine}", False, "target down", now)
    return [by_engine[k] for k in sorted(by_engine, key=int)]
