"""Helpers for the real-vLLM tests. The engine harness (``VllmEngine``: one DP=2 engine on CPU,
bounded calls, scraping, kills every descendant on close) lives in the package,
:mod:`instrumented_core.vllm_support.engine`, shared with ``instrumented-core demo --engine
vllm``; it is re-exported here. What stays here is test-only: the token baseline engine run in
a child process.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from typing import Any

from instrumented_core.vllm_support.engine import (  # noqa: F401 - re-exported for the tests
    COUNTERS,
    MODE_TOKENS,
    PROMPTS,
    START_TIMEOUT,
    Traffic,
    VllmClient,
    VllmEngine,
    barrier_all,
    barrier_engine,
    bounded,
    counters,
    delta,
    doctor_until,
    free_port_base,
    generate,
    new_request_id,
    wait_for,
    wait_routed,
)

# ----------------------------------------------------------------------------------------------
# token baseline in a separate process
# ----------------------------------------------------------------------------------------------
# A second AsyncLLM in the same front-end process does not serve requests after the first one
# was shut down (vLLM 0.32 front-end state), so engines other than the module's shared one run
# in a child Python process (its own session: a child past its timeout is killed with its whole
# process group). The child's ``VllmEngine.close`` removes its engine's shared memory.


async def token_runs(llm: Any) -> dict[str, list[list[int]]]:
    """Greedy and seeded-sampling tokens for PROMPTS, spread over both ranks."""
    from vllm import SamplingParams

    greedy = await asyncio.gather(*(generate(llm, PROMPTS[i], max_tokens=12, dp_rank=i % 2)
                                    for i in range(4)))

    async def sampled(prompt: list[int], rank: int) -> list[int]:
        params = SamplingParams(max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True)
        last = None
        async for out in llm.generate({"prompt_token_ids": prompt}, params,
                                      new_request_id("seeded"), data_parallel_rank=rank):
            last = out
        return list(last.outputs[0].token_ids)

    seeded = await asyncio.gather(*(sampled(PROMPTS[i], i % 2) for i in range(4)))
    return {"greedy": [g["tokens"] for g in greedy], "seeded": seeded}


class BaselineTokens:
    """:func:`token_runs` from an engine started in a child process with ``env``, started now
    and collected by :meth:`result`. Its start overlaps whatever this process does meanwhile
    (the module's own engine start: each start keeps about one of two cores busy)."""

    def __init__(self, env: dict[str, str], timeout: float = 300.0) -> None:
        import subprocess
        import sys

        self.deadline = time.monotonic() + timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="ic-vllm-baseline-")
        self._out = os.path.join(self._tmp.name, "tokens.json")
        self._err = open(os.path.join(self._tmp.name, "stderr.txt"), "w+b")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), self._out],
                                     env={**os.environ, **env}, start_new_session=True,
                                     stdout=subprocess.DEVNULL, stderr=self._err)

    def result(self) -> dict:
        """Wait for the child (bounded by the timeout given at start), then its tokens."""
        import json
        import subprocess

        try:
            try:
                self.proc.wait(max(1.0, self.deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise RuntimeError("baseline engine did not finish in time") from None
            if self.proc.returncode != 0:
                self._err.seek(0)
                raise RuntimeError(f"baseline engine failed ({self.proc.returncode}): "
                                   f"{self._err.read().decode(errors='replace')[-2000:]}")
            with open(self._out) as f:
                return json.load(f)
        finally:
            self.close()

    def close(self) -> None:
        """End the child's whole session (a no-op once it has exited)."""
        import signal

        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        self._err.close()
        self._tmp.cleanup()


def tokens_in_subprocess(env: dict[str, str], timeout: float = 180.0) -> dict:
    """Start an engine in a child process with ``env``, return :func:`token_runs` from it."""
    return BaselineTokens(env, timeout).result()


def _baseline_main(out_path: str) -> int:
    import json

    engine = VllmEngine(metrics=False)
    try:
        engine.start_served()
        tokens = engine.run(token_runs(engine.llm), 60, "baseline generation")
    finally:
        engine.close()
    with open(out_path, "w") as f:
        json.dump(tokens, f)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_baseline_main(sys.argv[1]))
