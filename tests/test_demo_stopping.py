"""Every way of stopping ``instrumented-core demo`` takes its process tree down (issue 16).

Four demos run at once on the CPU cluster (one rank each, the cheapest tree); once each story
is under way, one gets SIGINT, one SIGTERM, one SIGHUP and one SIGKILL (the parent dying
without a word). For each: no rank or coordinator process survives, every metrics port is free again, and (all but
SIGKILL) the exit status is 128 + the signal with one line on stderr, and ``summary.json`` and
``report.html`` hold what the run had.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from instrumented_core.stopping import alive, descendants
from tests.helpers import wait_until

pytestmark = pytest.mark.cluster

CLI = [sys.executable, "-m", "instrumented_core.cli", "demo", "--no-live", "--ranks", "1",
       "--duration", "60", "--fault", "none", "--metrics-port-base", "0"]
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL)


def port_free(port: int) -> bool:
    """Whether the next demo's server could listen there (as servers do, with SO_REUSEADDR:
    the recorder's closed connections may linger in TIME_WAIT)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
    return True


def test_every_signal_takes_the_demo_tree_down_and_frees_its_ports(tmp_path):
    demos = {}
    try:
        for sig in SIGNALS:
            out = tmp_path / sig.name
            demos[sig] = (subprocess.Popen([*CLI, "--out", str(out)], stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True,
                                           start_new_session=True), out)
        for sig, (proc, out) in demos.items():
            lines = []
            deadline = time.monotonic() + 90
            while not any(line.startswith("[") and "traffic for" in line for line in lines):
                line = proc.stdout.readline()
                assert line and time.monotonic() < deadline, (
                    f"{sig.name} demo never started its story:\n{''.join(lines)}"
                    f"{proc.stderr.read() if proc.poll() is not None else ''}")
                lines.append(line)
            ports = [int(p) for p in re.findall(r"rank \d+ metrics: http://127\.0\.0\.1:(\d+)",
                                                "".join(lines))]
            assert len(ports) == 1, lines
            tree = descendants(proc.pid)
            assert len(tree) >= 2, f"expected a rank and a coordinator under the demo: {tree}"
            demos[sig] = (proc, out, ports, tree)
        for sig, (proc, *_rest) in demos.items():
            os.kill(proc.pid, sig)
        failures = []
        for sig, (proc, out, ports, tree) in demos.items():
            try:
                rest, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                failures.append(f"{sig.name}: the demo did not exit within 60 s")
                continue
            if not wait_until(lambda t=tree: not any(alive(p) for p in t), 15):
                failures.append(f"{sig.name}: processes survived: "
                                f"{[p for p in tree if alive(p)]}")
            if not wait_until(lambda p=ports: all(port_free(x) for x in p), 10):
                failures.append(f"{sig.name}: metrics ports still taken: {ports}")
            if sig == signal.SIGKILL:
                if proc.returncode != -signal.SIGKILL:
                    failures.append(f"SIGKILL: exit {proc.returncode}")
                continue
            if proc.returncode != 128 + sig:
                failures.append(f"{sig.name}: exit {proc.returncode}, want {128 + sig}: {err}")
            lines = err.strip().splitlines()
            if len(lines) != 1 or f"stopped by {sig.name}" not in lines[0]:
                failures.append(f"{sig.name}: stderr is not one line naming it: {err!r}")
            summary = json.loads((out / "summary.json").read_text())
            if summary.get("stopped_by") != sig.name or summary["verdict"] != "no_verdict":
                failures.append(f"{sig.name}: summary {summary.get('stopped_by')} "
                                f"{summary['verdict']}")
            if not (out / "report.html").exists() or "Traceback" in rest + err:
                failures.append(f"{sig.name}: no report, or a traceback: {rest[-500:]}")
        assert not failures, "\n".join(failures)
    finally:
        for proc, *_rest in demos.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)
