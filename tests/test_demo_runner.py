"""The story runner on an engine whose processes fail mid-story (no real processes: the
engine adapter is a stand-in whose client raises what the CPU cluster raises).

What a user relies on: an engine error during the story's first pause is one line on stderr
and exit status 1, never a traceback; the engine is closed; ``summary.json`` and
``report.html`` still hold what the run had, saying why there is no verdict.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from instrumented_core.cluster import ClusterError
from instrumented_core.demo import DemoOptions, Plan, run_story


class _Client:
    ranks = 2
    barrier_timeout = 1.0

    def __init__(self, error: BaseException) -> None:
        self.error = error

    async def pause(self, mode: str) -> None:
        raise self.error


class _Traffic:
    enabled = False
    cancelled = False

    async def finish(self) -> list[str] | None:
        return None

    def cancel(self) -> None:
        self.cancelled = True


class _Engine:
    """Starts nothing; its client fails as the cluster's does when a rank dies."""

    first_wait = gap = 0.0
    fault_deadline = 1.0
    error: BaseException = ClusterError("rank 1 exited (exit code -9)")
    last: _Engine | None = None

    def __init__(self, plan: Plan) -> None:
        self.metrics_urls: list[str] = []
        self.closed = False
        self._traffic = _Traffic()
        type(self).last = self

    def describe(self) -> str:
        return "starting nothing"

    def start(self, out) -> None:
        pass

    def run(self, story, budget: float) -> None:
        asyncio.run(story)

    def client(self) -> Any:
        return _Client(self.error)

    async def warm_up(self) -> None:
        pass

    def traffic(self, rng) -> _Traffic:
        return self._traffic

    async def inject(self, story, state, traffic):
        raise AssertionError("the story never gets this far")

    def close(self) -> None:
        self.closed = True

    def summary_fields(self) -> dict[str, Any]:
        return {}


def test_an_engine_error_in_the_first_pause_is_one_line_and_keeps_the_run(tmp_path):
    error = _Engine.error
    out_lines: list[str] = []
    err_lines: list[str] = []
    options = DemoOptions(ranks=2, fault="none", duration=1.0, out=str(tmp_path), live=False,
                          seed=3)
    code = run_story(_Engine, options, out_lines.append, err_lines.append)
    assert code == 1
    assert len(err_lines) == 1, err_lines
    assert err_lines[0].startswith("instrumented-core: error: the story failed ("), err_lines
    assert str(error) in err_lines[0] and str(tmp_path) in err_lines[0]
    engine = _Engine.last
    assert engine is not None and engine.closed and engine._traffic.cancelled
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["verdict"] == "no_verdict"
    assert str(error) in summary["failure"] and str(error) in summary["summary"]
    assert "the story failed" in (tmp_path / "events.jsonl").read_text()
    assert (tmp_path / "report.html").read_text().count("no_verdict") >= 1
