"""Bad input: one line on stderr, the documented exit code, no traceback; garbage scrapes
never make a healthy rank.

The table runs the command line as a user does (a subprocess per case, about 0.3 s each) over
every flag of ``doctor`` and the ``demo`` flags that take a value checked before anything
starts (--duration, --hold, --ranks, --out, --hosts: with it, a machine that cannot make
network namespaces is refused up front). The fuzz feeds the scrape parser random bytes,
truncated and oversized expositions and broken values, in-process.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from instrumented_core.cli import build_parser
from instrumented_core.diagnosis import diagnose
from instrumented_core.doctor import EXIT_STUCK, EXIT_UNREACHABLE
from instrumented_core.protocol import PauseStateMachine
from instrumented_core.scrape import (
    DIAGNOSIS_SERIES,
    REQUIRED_SERIES,
    sample_of_answer,
    scrape,
    to_view,
)
from instrumented_core.telemetry import names as n
from instrumented_core.telemetry.metrics import RankMetrics
from instrumented_core.telemetry.probe import TelemetryProbe

CLI = [sys.executable, "-m", "instrumented_core.cli"]
EXIT_USAGE = 2  # argparse's, and the CLI's for any bad value (documented in doctor --help)


# --- fake servers the --prometheus cases point at ---------------------------------------------

class _Fake(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        kind = self.server.kind  # type: ignore[attr-defined]
        if kind == "html":
            body, code, ctype = b"<html>Grafana</html>\n", 200, "text/html"
        else:  # Prometheus refusing a bad selector, as it does: 400 with a JSON error
            body = json.dumps({"status": "error", "errorType": "bad_data",
                               "error": '1:25: parse error: unexpected "(" in label matching'
                               }).encode()
            code, ctype = 400, "application/json"
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        pass


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, str]]:
    servers = {}
    for kind in ("html", "bad_selector"):
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
        server.kind = kind  # type: ignore[attr-defined]
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers[kind] = server
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        free = closed.getsockname()[1]  # nothing listens there once closed
    try:
        yield {"html": f"http://127.0.0.1:{servers['html'].server_address[1]}",
               "bad_selector": f"http://127.0.0.1:{servers['bad_selector'].server_address[1]}",
               "closed": f"http://127.0.0.1:{free}"}
    finally:
        for server in servers.values():
            server.shutdown()
            server.server_close()


# --- the table ----------------------------------------------------------------------------------

T = "127.0.0.1:8100"
#: A leading item that runs the case as root without any capability (a container that does
#: not allow network namespaces): ``setpriv`` drops them all before the CLI starts.
NO_CAPABILITIES = "(no capabilities)"
#: id: (argv, exit code, words of the one line). "{file}", "{html}", ... are filled per run.
CASES: dict[str, tuple[list[str], int, str]] = {
    # doctor --targets
    "doctor --targets empty": (["doctor", "--targets", " , "], 2, "--targets is empty"),
    "doctor --targets without a port": (["doctor", "--targets", "myhost"], 2, "not host:port"),
    "doctor --targets port out of range": (["doctor", "--targets", "h:99999"], 2, "not host:port"),
    "doctor --targets negative port": (["doctor", "--targets", "h:-1"], 2, "not host:port"),
    "doctor --targets port not a number": (["doctor", "--targets", "h:x"], 2, "not host:port"),
    "doctor --targets ftp URL": (["doctor", "--targets", "ftp://h:1"], 2, "not host:port"),
    # doctor --prometheus
    "doctor --prometheus empty": (["doctor", "--prometheus", ""], 2, "not a base URL"),
    "doctor --prometheus no scheme": (["doctor", "--prometheus", "prom:9090"], 2,
                                      "not a base URL"),
    "doctor --prometheus bad port": (["doctor", "--prometheus", "http://h:x"], 2,
                                     "not a base URL"),
    "doctor --prometheus unreachable": (["doctor", "--prometheus", "{closed}"],
                                        EXIT_UNREACHABLE, "cannot reach Prometheus"),
    "doctor --prometheus not JSON": (["doctor", "--prometheus", "{html}"], EXIT_STUCK,
                                     "not Prometheus' JSON API"),
    "doctor --prometheus and --targets": (["doctor", "--prometheus", "{html}", "--targets", T],
                                          2, "not allowed with"),
    "doctor without a source": (["doctor"], 2, "one of the arguments"),
    # doctor --selector
    "doctor --selector Prometheus refuses (400)": (
        ["doctor", "--prometheus", "{bad_selector}", "--selector", 'model_name=~"('],
        EXIT_STUCK, "Prometheus refused the query (bad_data"),
    "doctor --selector without --prometheus": (["doctor", "--targets", T, "--selector", "x"],
                                               2, "--selector needs --prometheus"),
    # doctor --threshold
    **{f"doctor --threshold {bad}": (["doctor", "--targets", T, f"--threshold={bad}"], 2, why)
       for bad, why in [("nan", "finite"), ("inf", "finite"), ("-inf", "finite"),
                        ("1e400", "finite"), ("-1", "> 0"), ("0", "> 0"),
                        ("abc", "expects seconds"), ("", "expects seconds"),
                        ("1e9", "at most 86400")]},
    # doctor --stacks / --json take no value
    "doctor --stacks=yes": (["doctor", "--targets", T, "--stacks=yes"], 2,
                            "ignored explicit argument"),
    "doctor --json=1": (["doctor", "--targets", T, "--json=1"], 2, "ignored explicit argument"),
    # demo --duration / --hold
    **{f"demo --duration {bad}": (["demo", "--duration", bad], 2, why)
       for bad, why in [("nan", "finite"), ("inf", "finite"), ("1e400", "finite"),
                        ("-5", "> 0"), ("0", "> 0"), ("soon", "expects seconds"),
                        ("1e6", "at most")]},
    **{f"demo --hold {bad}": (["demo", "--hold", bad], 2, why)
       for bad, why in [("inf", "finite"), ("nan", "finite"), ("1e400", "finite"),
                        ("-5", ">= 0"), ("x", "expects seconds")]},
    # demo --ranks
    **{f"demo --ranks {bad}": (["demo", "--ranks", bad], 2, why)
       for bad, why in [("0", ">= 1"), ("-3", ">= 1"), ("abc", "must be an integer"),
                        ("1e3", "must be an integer"), ("1000", "more than this machine can run")]},
    # demo --out
    "demo --out a file": (["demo", "--out", "{file}"], 2, "is a file, not a directory"),
    "demo --out under a file": (["demo", "--out", "{file}/sub"], 2, "is under a file"),
    "doctor --bundle in a missing directory": (
        ["doctor", "--targets", "127.0.0.1:1", "--bundle", "{file}/x.tar.gz"], 2,
        "does not exist"),
    "doctor --flight-dir a file": (
        ["doctor", "--targets", "127.0.0.1:1", "--flight-dir", "{file}"], 2,
        "is a file, not a directory"),
    "demo --out cannot be created": (["demo", "--out", "/proc/instrumented-core/out"], 2,
                                     "cannot be used"),
    "demo --out empty": (["demo", "--out", ""], 2, "--out is empty"),
    # demo --hosts: the flags, then whether this machine can make network namespaces
    **{f"demo --hosts {bad}": (["demo", "--hosts", bad], 2, why)
       for bad, why in [("1", "--hosts must be >= 2"), ("0", "--hosts must be >= 1"),
                        ("two", "--hosts must be an integer")]},
    "demo --hosts more than ranks": (["demo", "--ranks", "2", "--hosts", "3"], 2,
                                     "more hosts than ranks (2)"),
    "demo --hosts with --engine vllm": (["demo", "--engine", "vllm", "--hosts", "2"], 2,
                                        "use it with --engine cpu"),
    "demo --hosts without iproute2": (["PATH=/nonexistent", "demo", "--hosts", "2"], 2,
                                      "iproute2's `ip` is not installed: install it"),
    "demo --hosts without the rights for namespaces": (
        [NO_CAPABILITIES, "demo", "--hosts", "2"], 2,
        "network namespaces cannot be made here (`ip netns add`: "),
    # the environment (leading NAME=value items): nothing to watch with telemetry off
    **{f"demo {engine} with telemetry off": (
        ["INSTRUMENTED_CORE_TELEMETRY=0", "demo", "--engine", engine], 2,
        "INSTRUMENTED_CORE_TELEMETRY=0 turns off the metrics the demo watches")
       for engine in ("cpu", "vllm")},
}


@pytest.mark.parametrize("argv, code, words", CASES.values(), ids=CASES)
def test_a_bad_value_is_one_line_with_the_documented_exit_code(tmp_path, fakes, argv, code,
                                                               words):
    afile = tmp_path / "a-file"
    afile.write_text("not a directory\n")
    env = dict(os.environ)
    while argv and "=" in argv[0] and argv[0].split("=", 1)[0].isupper():
        name, value = argv[0].split("=", 1)
        env[name], argv = value, argv[1:]
    prefix = []
    if argv and argv[0] == NO_CAPABILITIES:
        prefix, argv = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"], argv[1:]
    argv = [a.format(file=afile, **fakes) for a in argv]
    result = subprocess.run([*prefix, *CLI, *argv], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path, env=env)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("instrumented-core: error: "), lines[0]
    assert words in lines[0], lines[0]
    assert result.returncode == code, (result.returncode, lines[0])
    assert result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing started


def test_the_table_covers_every_doctor_flag_and_the_checked_demo_flags():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    flags = {f for a in sub.choices["doctor"]._actions for f in a.option_strings} - {"-h",
                                                                                   "--help"}
    flags |= {"--duration", "--hold", "--ranks", "--out", "--hosts"}
    covered = {a.split("=", 1)[0] for argv, _, _ in CASES.values() for a in argv
               if a.startswith("--")}
    assert flags <= covered, sorted(flags - covered)


# --- fuzz of the scrape parser ----------------------------------------------------------------

def _exposition() -> bytes:
    registry = CollectorRegistry()
    probe = TelemetryProbe(0, 1, RankMetrics(registry, 0, "m", {"protocol": "two-phase"}),
                           None, model_name="m")
    sm = PauseStateMachine(0, 1, 16, probe=probe)  # DP=1: one rank is the whole deployment
    sm.request_counts = lambda: (2, 1)
    return generate_latest(registry)


def _check(body: bytes, status: int = 200) -> tuple[object, object]:
    """What the doctor makes of one answer: it never raises; returns (view, verdict)."""
    sample = sample_of_answer("fuzz:1", status, body, DIAGNOSIS_SERIES)
    view = to_view(sample, 0)
    verdict = diagnose([view], 2.0)
    return view, verdict


def test_random_bytes_never_raise_and_never_make_a_rank():
    rng = random.Random(16)
    full = _exposition()
    for i in range(400):
        size = rng.choice([0, 1, 10, 100, 1000, 20_000])
        if i % 4 == 0:  # random bytes
            body = rng.randbytes(size)
        elif i % 4 == 1:  # random printable text with newlines and braces
            body = "".join(rng.choice('vllm_dp_ {}="\n#,.0123456789eE+-naif') for _ in
                           range(size)).encode()
        elif i % 4 == 2:  # our exposition with bytes flipped
            body = bytearray(full)
            for _ in range(rng.randint(1, 50)):
                body[rng.randrange(len(body))] = rng.randrange(256)
            body = bytes(body)
        else:  # lines of the exposition shuffled, some duplicated or dropped
            lines = full.splitlines()
            rng.shuffle(lines)
            body = b"\n".join(lines[: rng.randrange(len(lines))]) + b"\n"
        view, verdict = _check(body)
        if view.not_endpoint is None:  # only a flipped byte in a value or label can pass
            assert i % 4 in (2, 3), body[:200]
        else:
            assert verdict.kind == "not_dp_endpoint" and not verdict.healthy


def test_a_truncated_exposition_is_flagged_unless_it_lost_nothing_required():
    full = _exposition()
    rng = random.Random(7)
    cuts = sorted({*range(0, len(full), 97), *(rng.randrange(len(full)) for _ in range(300))})
    for cut in cuts:
        body = full[:cut]
        view, verdict = _check(body)
        at_line_end = body.endswith(b"\n")
        names = {line.split(b"{")[0].split(b" ")[0].decode() for line in body.splitlines()
                 if line and not line.startswith(b"#")}
        if view.not_endpoint is None:
            assert at_line_end and REQUIRED_SERIES <= names, cut
        else:
            assert not verdict.healthy, cut
    whole_view, whole = _check(full)
    assert whole_view.not_endpoint is None and whole.kind == "healthy"


def test_an_answer_shorter_than_its_content_length_is_not_a_rank():
    full = _exposition()

    class Short(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(full)))
            self.end_headers()
            self.wfile.write(full[: len(full) // 2])  # then the connection closes

        def log_message(self, format: str, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Short)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        sample = scrape(f"127.0.0.1:{server.server_address[1]}", timeout=2.0)
    finally:
        server.shutdown()
        server.server_close()
    assert not sample.reachable or sample.problem
    assert to_view(sample, 0).reachable is False or to_view(sample, 0).not_endpoint


@pytest.mark.parametrize("body", [
    b"x" * 5_000_000 + b"\n",
    b'vllm_dp_pause_phase{engine="0",model_name="' + b"m" * 2_000_000 + b'"} 0\n',
    b"vllm_dp_size " + b"9" * 1_000_000 + b"\n",
    b"# HELP " + b"h" * 3_000_000 + b"\n",
], ids=["a 5 MB line", "a 2 MB label", "a million-digit value", "a 3 MB comment"])
def test_huge_lines_never_raise_and_never_make_a_rank(body):
    view, verdict = _check(body)
    assert view.not_endpoint and not verdict.healthy


def _with(replace: bytes, by: bytes) -> bytes:
    full = _exposition()
    assert replace in full, replace
    return full.replace(replace, by)


@pytest.mark.parametrize("body, words", [
    (_with(b'vllm_dp_size{engine="0",model_name="m"} 1.0',
           b'vllm_dp_size{engine="x",model_name="m"} 1.0'), "engine label 'x'"),
    (_with(b'vllm_dp_size{engine="0",model_name="m"} 1.0',
           b'vllm_dp_size{engine="-1",model_name="m"} 1.0'), "engine label '-1'"),
    (_with(b'vllm_dp_size{engine="0",model_name="m"} 1.0',
           b'vllm_dp_size{engine="0",model_name="m"} NaN'), "vllm_dp_size is nan"),
    (_with(b'vllm_dp_size{engine="0",model_name="m"} 1.0',
           b'vllm_dp_size{engine="0",model_name="m"} +Inf'), "vllm_dp_size is inf"),
    (_with(b'vllm_dp_size{engine="0",model_name="m"} 1.0',
           b'vllm_dp_size{engine="0",model_name="m"} 0.0'), "vllm_dp_size is 0"),
    (_with(b'vllm_dp_pause_phase{engine="0",model_name="m"} 0.0',
           b'vllm_dp_pause_phase{engine="0",model_name="m"} NaN'), "not a phase code"),
    (_with(b'vllm_dp_pause_phase{engine="0",model_name="m"} 0.0',
           b'vllm_dp_pause_phase{engine="0",model_name="m"} 7.0'), "not a phase code"),
    (_with(b'vllm_dp_size{engine="0",model_name="m"} 1.0',
           b'vllm_dp_size{engine="0",model_name="m"} two'), "not a Prometheus text exposition"),
    (_with(b'vllm_dp_size{engine="0",model_name="m"} 1.0\n',
           b'vllm_dp_size{engine="0",model_name="m"} 1.0\nvllm_dp_size{engine="1",'
           b'model_name="m"} 1.0\n'), "2 engines on one endpoint"),
], ids=["engine not a number", "negative engine", "NaN size", "infinite size", "size 0",
        "NaN phase", "unknown phase", "malformed value", "two engines"])
def test_broken_values_are_named_never_a_rank(body, words):
    view, verdict = _check(body)
    assert view.not_endpoint and words in view.not_endpoint, view.not_endpoint
    assert verdict.kind == "not_dp_endpoint"


def test_infinite_and_nan_values_elsewhere_never_raise():
    full = _exposition()
    for value in (b"NaN", b"+Inf", b"-Inf", b"1e400", b"-0"):
        body = b"\n".join(
            line if line.startswith(b"#") or n.DP_SIZE.encode() in line or n.PHASE.encode() in line
            else line.rsplit(b" ", 1)[0] + b" " + value for line in full.splitlines()) + b"\n"
        view, verdict = _check(body)  # a rank, or named not one: never an exception
        assert verdict.kind in ("healthy", "not_dp_endpoint", "wedged", "pausing"), (value,
                                                                                     verdict)
