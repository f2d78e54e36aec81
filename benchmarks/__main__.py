"""``python -m benchmarks [--quick] [--only SECTION ...] [--no-alert]``: JSON lines on stdout.

Sections, run in this order (also with --only): overhead, detection, pause, scale, exporter,
vllm (the real engine; not in --quick), hooks (the vLLM step wrapper and the worker board;
against the vllm section's step when it ran in the same invocation), multihost (DP over two
network-namespace hosts: the sync all-reduce over the bridge, partition detection; root;
not in --quick). Progress goes to stderr.
Every child process (cluster ranks, Gloo workers, Prometheus, vLLM engines) is ended before
the command returns.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

SECTIONS = ("overhead", "detection", "pause", "scale", "exporter", "vllm", "hooks", "multihost")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="a run under 60 s: fewer repetitions, DP 2 cluster overhead only, "
                             "pause latency by simulation only, no Prometheus alert wait")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument("--no-alert", action="store_true",
                        help="skip waiting for the Prometheus alert (about 30 s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)

    from benchmarks import (
        detection,
        exporter,
        hooks,
        multihost,
        overhead,
        pause_latency,
        scale,
        vllm_engine,
    )
    from benchmarks.common import cleanup, emit, log

    sections = [s for s in SECTIONS if (s in args.only if args.only else
                                        not (args.quick and s in ("vllm", "multihost")))]
    started = time.monotonic()
    step_seconds = None
    vllm_measured = None
    failed = []
    for section in sections:
        t0 = time.monotonic()
        try:
            if section == "overhead":
                out = overhead.run(args.quick)
                step_seconds = 1 / out["rates"][2]["on"]
            elif section == "detection":
                detection.run(args.quick, with_alert=not (args.quick or args.no_alert))
            elif section == "pause":
                pause_latency.run(args.quick, step_seconds)
            elif section == "scale":
                scale.run(args.quick)
            elif section == "exporter":
                exporter.run(args.quick)
            elif section == "vllm":
                vllm_measured = vllm_engine.run(args.quick)
            elif section == "hooks":
                hooks.run(args.quick, vllm_measured)
            elif section == "multihost":
                multihost.run(args.quick, with_alert=not (args.quick or args.no_alert))
        except Exception as e:  # noqa: BLE001 - one failed section must not hide the others
            failed.append(section)
            log(f"{section} failed: {e!r}")
            emit(f"{section}.error", "", value=None, error=repr(e)[:300])
        log(f"{section}: {time.monotonic() - t0:.1f} s")
    cleanup()
    emit("benchmarks.wall_seconds", "s", value=time.monotonic() - started, quick=args.quick,
         sections=sections, failed_sections=failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
