"""Section multihost: DP across two "hosts" (network namespaces on one bridge, tests/netns.py).

 (a) the 2-int sync all-reduce (vLLM's ``sync_dp_state`` tensor) over Gloo, ranks spread over
     two hosts (the veth bridge) against all ranks on loopback, at DP 2 (one rank per host)
     and DP 4 (two per host), measured in the same run;
 (b) detection latency of a partition: a DP 4 CPU cluster over two hosts with traffic, the
     second host's link set down at t0; then the time until the doctor, run from the
     monitor host every 0.3 s, says stuck naming ranks 2 and 3, and (not with --quick /
     --no-alert) until ``VllmDpPeersStalledOnUnreachableRank`` fires in a real Prometheus on
     the monitor host (``otel-config/prometheus-multihost.yml``, 1 s scrape and evaluation;
     bound: the rule's 10 s + ``for: 15s`` + a scrape + an evaluation). The single-host
     figures for a stalled rank are the detection section's.

Needs root and network namespaces; everything it makes is removed on the way out.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
import subprocess
import time
import urllib.request
from pathlib import Path

from benchmarks.common import emit, log, percentile, tempdir

ROOT = Path(__file__).resolve().parent.parent
ALERT = "VllmDpPeersStalledOnUnreachableRank"
ALERT_BOUND_S = 10.0 + 15.0 + 1.0 + 1.0


def _allreduce_worker(rank: int, world: int, master: str, port: int, netns: str | None,
                      ifname: str, number: int, out) -> None:
    if netns:
        from instrumented_core.cluster.placement import join_netns

        join_netns(netns)
    os.environ["GLOO_SOCKET_IFNAME"] = ifname
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{master}:{port}", rank=rank,
                            world_size=world)
    tensor = torch.tensor([1, 0], dtype=torch.int32)
    for _ in range(200):
        dist.all_reduce(tensor)
    samples = []
    for _ in range(number):
        t0 = time.perf_counter()
        dist.all_reduce(tensor)
        samples.append(time.perf_counter() - t0)
    dist.barrier()
    if rank == 0:
        out.put(samples)
    dist.destroy_process_group()


def allreduce_us(world: int, number: int, lab=None, timeout: float = 120.0) -> dict:
    """p50/p99 of the 2-int all-reduce, in microseconds; ``lab``: ranks spread over its hosts."""
    from instrumented_core.cluster.client import free_port

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    if lab is None:
        places = [(None, "lo")] * world
        master = "127.0.0.1"
    else:
        hosts = lab.rank_hosts(world)
        places = [(h.netns, h.ifname) for h in hosts]
        master = hosts[0].address
    port = free_port()
    procs = [ctx.Process(target=_allreduce_worker, daemon=True,
                         args=(r, world, master, port, places[r][0], places[r][1], number, out))
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        samples = out.get(timeout=timeout)
    except queue.Empty:
        raise RuntimeError(f"Gloo all-reduce at DP {world} produced no samples in time") \
            from None
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(2)
    us = [x * 1e6 for x in samples]
    return {"p50": percentile(us, 50), "p99": percentile(us, 99), "n": len(us)}


def _prometheus(lab, tmp: Path, targets_by_host: dict[int, list[str]]):
    """Prometheus on the monitor host with the shipped multi-host config (1 s intervals)."""
    import yaml

    from tests.netns import in_netns

    otel = ROOT / "otel-config"
    config = yaml.safe_load((otel / "prometheus-multihost.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(otel / f) for f in config["rule_files"]]
    config.pop("alerting")
    [job] = config["scrape_configs"]
    job["file_sd_configs"] = [{"files": [str(tmp / "targets" / "*.json")],
                               "refresh_interval": "1s"}]
    (tmp / "targets").mkdir(exist_ok=True)
    for host, targets in targets_by_host.items():
        (tmp / "targets" / f"host{host}.json").write_text(json.dumps([{"targets": targets}]))
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = 9090
    proc = subprocess.Popen(lab.exec_argv(lab.monitor, [
        "prometheus", f"--config.file={tmp / 'prometheus.yml'}",
        f"--web.listen-address=127.0.0.1:{port}", f"--storage.tsdb.path={tmp / 'data'}",
        "--log.level=error"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def get(path: str):
        def read():
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                return json.loads(r.read())
        return in_netns(lab.monitor, read)

    return proc, get


def detection(quick: bool, with_alert: bool) -> None:
    from instrumented_core.cluster import Cluster, ClusterConfig
    from instrumented_core.doctor import run_doctor
    from instrumented_core.telemetry import TelemetryConfig
    from tests.netns import Lab, in_netns

    tmp = Path(tempdir("ic-bench-multihost-"))
    with Lab(2) as lab:
        cfg = ClusterConfig(ranks=4, sync_interval=16, hang_timeout=300, collective_timeout=300,
                            hosts=lab.rank_hosts(4),
                            telemetry=TelemetryConfig(metrics_port_base=8100,
                                                      spans_file=str(tmp / "spans.jsonl")))
        prom = None
        with Cluster(cfg) as cluster:
            targets = [u.split("//", 1)[1].split("/", 1)[0] for u in cluster.metrics_urls if u]
            if with_alert:
                prom, get = _prometheus(lab, tmp, {0: targets[:2], 1: targets[2:]})
            try:
                for r in range(4):
                    cluster.generate(10**7, rank=r)
                if prom is not None:
                    deadline = time.monotonic() + 60
                    while True:
                        try:
                            active = get("/api/v1/targets")["data"]["activeTargets"]
                        except OSError:  # not listening yet
                            active = []
                        if sum(t["health"] == "up" for t in active) == 4:
                            break
                        if time.monotonic() > deadline:
                            raise RuntimeError("Prometheus did not scrape the 4 ranks")
                        time.sleep(0.5)
                    time.sleep(3)  # rates and last_over_time need a few samples
                else:
                    time.sleep(2)
                t0 = time.monotonic()
                lab.partition(lab.hosts[1])
                doctor_s = None
                while time.monotonic() - t0 < 60:
                    report = in_netns(lab.monitor, lambda: run_doctor(targets))
                    if report.verdict.kind == "stuck" and report.verdict.culprits == [2, 3]:
                        doctor_s = time.monotonic() - t0
                        break
                    time.sleep(0.3)
                emit("multihost.partition_to_doctor_verdict", "s", value=doctor_s,
                     verdict="stuck, ranks 2, 3 named with their host", doctor_threshold_s=2.0)
                if prom is not None:
                    alert_s = None
                    while time.monotonic() - t0 < 120:
                        alerts = get("/api/v1/alerts")["data"]["alerts"]
                        if any(a["labels"]["alertname"] == ALERT and a["state"] == "firing"
                               for a in alerts):
                            alert_s = time.monotonic() - t0
                            break
                        time.sleep(0.25)
                    emit("multihost.partition_to_alert_firing", "s", baseline=ALERT_BOUND_S,
                         instrumented=alert_s, alert=ALERT, scrape_s=1.0, eval_s=1.0,
                         note="baseline = the rule's theoretical bound")
            finally:
                lab.heal(lab.hosts[1])
                if prom is not None:
                    prom.terminate()
                    try:
                        prom.wait(10)
                    except subprocess.TimeoutExpired:
                        prom.kill()
                        prom.wait(5)


def run(quick: bool, with_alert: bool = True) -> None:
    from tests.netns import Lab

    number = 500 if quick else 3000
    with Lab(2) as lab:
        for world in (2, 4):
            loop = allreduce_us(world, number)
            bridge = allreduce_us(world, number, lab)
            log(f"all-reduce DP {world}: loopback p50 {loop['p50']:.0f} us, "
                f"bridge p50 {bridge['p50']:.0f} us")
            emit(f"multihost.sync_allreduce_2int_dp{world}_p50", "us", baseline=loop["p50"],
                 instrumented=bridge["p50"], hosts=2, n=bridge["n"],
                 note="baseline = all ranks on loopback; instrumented = over the veth bridge")
            emit(f"multihost.sync_allreduce_2int_dp{world}_p99", "us", baseline=loop["p99"],
                 instrumented=bridge["p99"], hosts=2, n=bridge["n"])
    detection(quick, with_alert)
