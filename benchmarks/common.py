"""Output and statistics helpers shared by the benchmark sections."""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

_RESULTS: list[dict] = []


def emit(name: str, unit: str, *, baseline: float | None = None,
         instrumented: float | None = None, value: float | None = None,
         ratio: float | None = None, **extra: Any) -> dict:
    """Print one JSON line. ``ratio`` defaults to instrumented / baseline."""
    record: dict[str, Any] = {"name": name}
    if value is not None:
        record["value"] = _round(value)
    if baseline is not None or instrumented is not None:
        record["baseline"] = _round(baseline)
        record["instrumented"] = _round(instrumented)
        if ratio is None and baseline and instrumented is not None:
            ratio = instrumented / baseline
    if ratio is not None:
        record["ratio"] = _round(ratio, 4)
    record["unit"] = unit
    record.update({k: _round(v) if isinstance(v, float) else v for k, v in extra.items()})
    _RESULTS.append(record)
    print(json.dumps(record), flush=True)
    return record


def results() -> list[dict]:
    return list(_RESULTS)


def log(message: str) -> None:
    """Progress on stderr, so stdout stays pure JSON lines."""
    print(f"[benchmarks {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _round(value, digits: int = 6):
    if value is None or not isinstance(value, float):
        return value
    if math.isnan(value) or math.isinf(value):
        return None
    if value == 0:
        return 0.0
    return float(f"{value:.{digits}g}")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[k]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def per_call_seconds(fn: Callable[[], None], number: int) -> float:
    """Seconds per call of ``fn`` over ``number`` calls (loop overhead included)."""
    started = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - started) / number


def interleaved(candidates: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run each measurement once per round, order alternating, to cancel drift."""
    names = list(candidates)
    out: dict[str, list[float]] = {k: [] for k in names}
    for i in range(rounds):
        order = names if i % 2 == 0 else list(reversed(names))
        for k in order:
            out[k].append(candidates[k]())
    return out


def start_clusters(configs: list) -> list:
    """Start several clusters at once (start-up is mostly waiting); stop all on failure."""
    import threading

    from instrumented_core.cluster import Cluster

    clusters = [Cluster(c) for c in configs]
    errors: list[BaseException] = []

    def start(c) -> None:
        try:
            c.start()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=start, args=(c,), daemon=True) for c in clusters]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        stop_clusters(clusters)
        raise errors[0]
    return clusters


def stop_clusters(clusters: list) -> None:
    for c in clusters:
        try:
            c.stop()
        except Exception as e:  # noqa: BLE001 - keep stopping the others
            log(f"stopping a cluster failed: {e!r}")


_TEMP_DIRS: list[str] = []


def tempdir(prefix: str) -> str:
    """A scratch directory removed by ``cleanup()`` at the end of the run."""
    import tempfile

    path = tempfile.mkdtemp(prefix=prefix)
    _TEMP_DIRS.append(path)
    return path


def cleanup() -> None:
    import shutil

    while _TEMP_DIRS:
        shutil.rmtree(_TEMP_DIRS.pop(), ignore_errors=True)
