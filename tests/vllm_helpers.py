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
# in a child Python process. (Starting it while the module's engine starts saves nothing here:
# the two starts share the two cores and took longer together than one after the other.)


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


def tokens_in_subprocess(env: dict[str, str], timeout: float = 180.0) -> dict:
    """Start an engine in a child process with ``env``, return :func:`token_runs` from it."""
    import json
    import signal
    import subprocess
    import sys

    with tempfile.TemporaryDirectory(prefix="ic-vllm-baseline-") as tmp:
        out = os.path.join(tmp, "tokens.json")
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), out],
                                env={**os.environ, **env}, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _, err = proc.communicate(timeout=timeout)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if proc.returncode != 0:
            raise RuntimeError(f"baseline engine failed ({proc.returncode}): "
                               f"{err.decode(errors='replace')[-2000:]}")
        with open(out) as f:
            return json.load(f)


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
