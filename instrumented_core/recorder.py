"""Records a run as it happens: per-rank samples from ``/metrics`` and the story's events.

The demo's live view, its verdict and its report all come from this one recording, which is
built only from what the ranks expose over HTTP (the same data an operator has).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path

from instrumented_core.run_files import EVENTS, METRICS_DIR, TIMELINE, rank_exposition
from instrumented_core.scrape import PHASE_NAMES, RankSample, scrape_all
from instrumented_core.telemetry import names as n


def row_of(sample: RankSample, rank: int) -> dict:
    """The per-rank fields the live view and report use, from one scrape."""
    if not sample.reachable or sample.problem:
        # an answer that is not our exposition is no rank state: shown like no answer
        return {"t": sample.fetched_at, "rank": rank, "reachable": False,
                **({"problem": sample.problem} if sample.problem else {})}
    inside = {c: sample.get(n.COLLECTIVE_INSIDE, 0.0, collective=c) or 0.0 for c in n.COLLECTIVES}
    collective, seconds = max(inside.items(), key=lambda kv: kv[1])
    return {
        "t": sample.fetched_at,
        "rank": rank,
        "reachable": True,
        "phase": PHASE_NAMES.get(int(sample.get(n.PHASE, 0) or 0), "running"),
        "wave": int(sample.get(n.CURRENT_WAVE, 0) or 0),
        "engines_running": bool(sample.get(n.ENGINES_RUNNING, 0)),
        "steps_real": int(sample.get(n.STEPS_TOTAL, 0, kind="real") or 0),
        "steps_dummy": int(sample.get(n.STEPS_TOTAL, 0, kind="dummy") or 0),
        "sync_rounds": int(sample.get(n.SYNC_WAIT_COUNT, 0) or 0),
        "sync_inside_seconds": inside[n.COLLECTIVE_SYNC],
        "inside": collective if seconds > 0 else None,
        "inside_seconds": seconds,
        "start_dp_wave": {o: int(sample.get(n.START_DP_WAVE_TOTAL, 0, outcome=o) or 0)
                          for o in n.WAVE_OUTCOMES},
        "pause_requests": int(sample.sum(n.PAUSE_REQUESTS_TOTAL)),
        "consensus": int(sample.get(n.PAUSE_CONSENSUS_TOTAL, 0) or 0),
        "last_progress": sample.get(n.LAST_PROGRESS, 0.0),
    }


class Recorder:
    """Scrapes every rank every ``interval`` seconds on a background thread."""

    def __init__(self, urls: list[str], out_dir: Path, interval: float = 0.25) -> None:
        self.urls = urls
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.interval = interval
        self.latest: list[dict] = []
        self.latest_samples: list[RankSample] = []
        self.events: list[dict] = []
        self.started = time.time()
        self._timeline = (self.out_dir / TIMELINE).open("w", encoding="utf-8")
        self._events = (self.out_dir / EVENTS).open("w", encoding="utf-8")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listeners: list = []
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)

    def start(self) -> Recorder:
        self._thread.start()
        return self

    def on_sample(self, callback) -> None:
        self._listeners.append(callback)

    def sample_now(self) -> list[RankSample]:
        samples = scrape_all(self.urls, timeout=0.5)
        rows = [row_of(s, r) for r, s in enumerate(samples)]
        with self._lock:
            self.latest, self.latest_samples = rows, samples
            for row in rows:
                self._timeline.write(json.dumps(row) + "\n")
        for callback in self._listeners:
            callback(rows)
        return samples

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample_now()
            self._stop.wait(self.interval)

    def save_expositions(self) -> None:
        """Final ``/metrics`` text of every rank, for the report's histograms."""
        directory = self.out_dir / METRICS_DIR
        directory.mkdir(exist_ok=True)
        for rank, url in enumerate(self.urls):
            try:
                with urllib.request.urlopen(url, timeout=1.0) as response:
                    (self.out_dir / rank_exposition(rank)).write_bytes(response.read())
            except OSError:
                pass  # unreachable rank: the timeline already says so

    def event(self, text: str, **fields) -> None:
        item = {"t": time.time(), "event": text, **fields}
        with self._lock:
            self.events.append(item)
            self._events.write(json.dumps(item) + "\n")
            self._events.flush()

    def finish(self) -> list[dict]:
        """Last sample and final expositions, then stop; returns the last rows."""
        self.sample_now()
        self.save_expositions()
        self.stop()
        return list(self.latest)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with self._lock:
            self._timeline.close()
            self._events.close()
