"""``instrumented-core doctor``: read live metrics, print a verdict that names the stuck rank.

Two scrapes half a second apart: one snapshot shows who sits inside which collective and for
how long; the pair gives each rank's share of time spent waiting in collectives, which is what
exposes a straggler. All ranks are scraped concurrently, so 64 ranks answer in well under 2 s.

Exit codes: 0 healthy, pausing or paused; 1 a straggler; 2 stuck, deadlock, wedged or a pause
not converging (and bad flags); 3 nothing answered (no rank, or no Prometheus); 4 what was read
cannot be vouched for (incomplete, mixed deployments, not a vLLM DP endpoint).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from instrumented_core.diagnosis import Verdict, diagnose
from instrumented_core.scrape import (
    DIAGNOSIS_SERIES,
    FetchError,
    RankSample,
    http_get,
    prometheus_samples,
    scrape_all,
    to_view,
)

EXIT_OK, EXIT_SLOW, EXIT_STUCK, EXIT_UNREACHABLE, EXIT_DOUBT = 0, 1, 2, 3, 4


@dataclass
class DoctorReport:
    verdict: Verdict
    samples: list[RankSample]
    ranks: list[int]
    elapsed: float
    stacks: dict[int, str]

    @property
    def exit_code(self) -> int:
        if self.samples and not any(s.reachable for s in self.samples):
            return EXIT_UNREACHABLE
        if self.verdict.healthy:
            return EXIT_OK
        if self.verdict.doubtful:
            return EXIT_DOUBT
        return EXIT_SLOW if self.verdict.kind == "slow" else EXIT_STUCK

    def render(self) -> str:
        v = self.verdict
        if self.samples and not any(s.reachable for s in self.samples):
            return "unreachable: no target answered (" + "; ".join(
                f"{s.target}: {s.error}" for s in self.samples) + ")"
        lines = [f"{v.kind.replace('_', ' ').upper()}: {v.summary}"]
        if v.culprits:
            lines.append("culprit: " + ", ".join(f"rank {r}" for r in v.culprits))
        if v.victims:
            lines.append("victims: " + ", ".join(f"rank {r}" for r in v.victims))
        lines += [f"  {d}" for d in v.details]
        for rank, stack in self.stacks.items():
            lines.append(f"--- engine thread stack of rank {rank} ---")
            lines.append(stack.rstrip())
        lines.append(f"({len(self.samples)} ranks read in {self.elapsed:.2f} s)")
        return "\n".join(lines)


def _rank_of(sample: RankSample, index: int) -> int:
    engine = sample.engine
    return engine if engine is not None else index


def fetch_stack(target: str, timeout: float = 2.0) -> str:
    base = target if target.startswith("http") else f"http://{target}"
    base = base.rsplit("/metrics", 1)[0].rstrip("/")
    hint = "enable it with INSTRUMENTED_CORE_DEBUG_ENDPOINT=1"
    try:
        status, body = http_get(base + "/debug/stacks", timeout, max_bytes=1024 * 1024)
    except FetchError as e:
        return f"(no stack: {base}/debug/stacks: {e}; {hint})"
    if status != 200:
        return f"(no stack: {base}/debug/stacks answered HTTP {status}; {hint})"
    return body.decode("utf-8", "replace")


def run_doctor(targets: list[str] | None = None, prometheus: str | None = None,
               threshold: float = 2.0, interval: float = 0.5, timeout: float = 1.0,
               stacks: bool = False, selector: str = "") -> DoctorReport:
    """Diagnose from per-rank endpoints (``targets``) or a Prometheus server (one deployment:
    raises :class:`~instrumented_core.scrape.PrometheusError` when it cannot answer, or when
    what ``selector`` matches holds more than one)."""
    started = time.monotonic()
    if prometheus:
        samples = prometheus_samples(prometheus, timeout=timeout * 2, selector=selector)
        ranks = [_rank_of(s, i) for i, s in enumerate(samples)]
        views = [to_view(s, r) for s, r in zip(samples, ranks)]
    else:
        targets = targets or []
        first = scrape_all(targets, timeout, DIAGNOSIS_SERIES)
        time.sleep(interval)
        samples = scrape_all(targets, timeout, DIAGNOSIS_SERIES)
        ranks = [_rank_of(s if s.reachable else f, i)
                 for i, (f, s) in enumerate(zip(first, samples))]
        views = [to_view(s, r, f) for s, r, f in zip(samples, ranks, first)]
    verdict = diagnose(views, threshold)
    fetched: dict[int, str] = {}
    if stacks and targets:
        by_rank = dict(zip(ranks, targets))
        for rank in verdict.culprits:
            if rank in by_rank:
                fetched[rank] = fetch_stack(by_rank[rank], timeout)
    return DoctorReport(verdict, samples, ranks, time.monotonic() - started, fetched)
