"""A multi-host lab on one machine: "hosts" as Linux network namespaces on one bridge.

Topology (everything lives inside namespaces this module creates; the root namespace gets no
interface, no address and no route, so nothing outside the lab can see its private /24)::

    monitor ns:  br0 = 10.N.M.1/24   (Prometheus, Alertmanager, the doctor run here)
        |- vh1 <-veth-> host1 ns: eth0 = 10.N.M.11   (ranks 0..k-1)
        |- vh2 <-veth-> host2 ns: eth0 = 10.N.M.12   (ranks k..)

Names are unique per run (``icnet-<pid>-<rand>-mon`` ...), and :meth:`Lab.close` removes every
namespace it made (deleting a namespace removes its veths and the bridge with it); use it as
a context manager so a failing or timed-out test still cleans up. Faults are real network
operations: a link set down (host partition), an ``unreachable`` route in the monitor only
(the monitor's path to one host cut while the hosts still talk), and a token bucket (``tbf``)
on a host's link: this kernel has no ``netem``, so the slow link is a rate limit whose queue
delays every packet.

Test/benchmark-only: it is not part of the installed package.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from instrumented_core.cluster.placement import CLONE_NEWNET, RankHost, join_netns

T = TypeVar("T")


class LabUnavailable(RuntimeError):
    """Network namespaces cannot be made here; the message says why and what is needed."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20,
                          check=check)


def check_available() -> None:
    """Raise :class:`LabUnavailable` (one line naming the need) unless namespaces work."""
    if shutil.which("ip") is None:
        raise LabUnavailable("iproute2 `ip` is not installed: apt-get install iproute2")
    if os.geteuid() != 0:
        raise LabUnavailable("network namespaces need root (CAP_NET_ADMIN, CAP_SYS_ADMIN): "
                             "run the multi-host tests as root")
    name = f"icchk{os.getpid()}"
    r = _ip("netns", "add", name, check=False)
    if r.returncode != 0:
        raise LabUnavailable(f"`ip netns add` fails here ({r.stderr.strip()}): the multi-host "
                             "tests need a kernel and container that allow network namespaces")
    _ip("netns", "del", name, check=False)


#: Every namespace a lab makes is named ``<PREFIX><pid>-<random>-...``: unique per run, and a
#: run killed before its clean-up (SIGKILL by a timeout) is recognised by its dead pid.
PREFIX = "icnet-"


def _end_processes_in(ns: str) -> None:
    """SIGKILL what still runs inside one of our namespaces (a test's children that escaped
    its own clean-up); nothing outside it is touched."""
    r = _ip("netns", "pids", ns, check=False)
    for pid in r.stdout.split():
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass


def sweep_stale() -> None:
    """Remove the namespaces of labs whose process is gone (killed before its clean-up)."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            _end_processes_in(name)
            _ip("netns", "del", name, check=False)


@dataclass
class Host:
    index: int
    netns: str
    address: str
    port: str  # the bridge-side veth in the monitor namespace


@dataclass
class Lab:
    hosts_count: int = 2
    tag: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}-{secrets.token_hex(2)}")
    hosts: list[Host] = field(default_factory=list)
    monitor: str = ""
    subnet: str = ""
    _made: list[str] = field(default_factory=list)

    def __enter__(self) -> Lab:
        check_available()
        sweep_stale()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def monitor_address(self) -> str:
        return f"{self.subnet}.1"

    def _build(self) -> None:
        # 10.<200-249>.<0-255>: a private /24 per run; it exists only inside these namespaces
        self.subnet = f"10.{200 + os.getpid() % 50}.{secrets.randbelow(256)}"
        self.monitor = f"{self.tag}-mon"
        _ip("netns", "add", self.monitor)
        self._made.append(self.monitor)
        m = ("-n", self.monitor)
        _ip(*m, "link", "set", "lo", "up")
        _ip(*m, "link", "add", "br0", "type", "bridge")
        _ip(*m, "addr", "add", f"{self.monitor_address}/24", "dev", "br0")
        _ip(*m, "link", "set", "br0", "up")
        for i in range(1, self.hosts_count + 1):
            ns = f"{self.tag}-h{i}"
            _ip("netns", "add", ns)
            self._made.append(ns)
            port = f"vh{i}"
            _ip(*m, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip(*m, "link", "set", port, "master", "br0")
            _ip(*m, "link", "set", port, "up")
            address = f"{self.subnet}.{10 + i}"
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            self.hosts.append(Host(i - 1, ns, address, port))

    def close(self) -> None:
        """Remove every namespace this lab made (idempotent). Processes still inside keep
        running: end them first."""
        for ns in reversed(self._made):
            _end_processes_in(ns)
            _ip("netns", "del", ns, check=False)
        self._made.clear()

    # -- placement --------------------------------------------------------------------------

    def rank_hosts(self, ranks: int) -> tuple[RankHost, ...]:
        """Ranks spread in blocks over the hosts (ranks 0..k-1 on the first host ...), the
        layout of vLLM's ``--data-parallel-size-local``."""
        per = -(-ranks // len(self.hosts))
        return tuple(RankHost(self.hosts[r // per].netns, self.hosts[r // per].address)
                     for r in range(ranks))

    def exec_argv(self, netns: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", netns, *argv]

    # -- faults -----------------------------------------------------------------------------

    def partition(self, host: Host) -> None:
        """Cut the host off the bridge (its link carrier goes down): no peer and no monitor
        reaches it, it reaches nobody."""
        _ip("-n", self.monitor, "link", "set", host.port, "down")

    def heal(self, host: Host) -> None:
        _ip("-n", self.monitor, "link", "set", host.port, "up")

    def cut_monitor(self, host: Host) -> None:
        """The monitor alone loses its path to the host (an ``unreachable`` route in the
        monitor namespace); the hosts still reach each other."""
        _ip("-n", self.monitor, "route", "add", "unreachable", f"{host.address}/32")

    def restore_monitor(self, host: Host) -> None:
        _ip("-n", self.monitor, "route", "del", "unreachable", f"{host.address}/32", check=False)

    def slow_link(self, host: Host, rate: str = "64kbit", latency_ms: int = 2000) -> None:
        """A slow link both ways (``tbf`` on the host's and the bridge side of its veth):
        packets queue behind the rate limit, every exchange takes longer."""
        for ns, dev in ((host.netns, "eth0"), (self.monitor, host.port)):
            subprocess.run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf",
                            "rate", rate, "burst", "1600", "latency", f"{latency_ms}ms"],
                           check=True, capture_output=True, text=True, timeout=20)

    def fast_link(self, host: Host) -> None:
        for ns, dev in ((host.netns, "eth0"), (self.monitor, host.port)):
            subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"],
                           capture_output=True, text=True, timeout=20)


@contextmanager
def inside(netns: str) -> Iterator[None]:
    """The calling thread inside ``netns`` for the block, then back where it was (its saved
    namespace, even on error). Threads and processes it starts inside inherit ``netns``: a
    Prometheus started here runs on the monitor host, a doctor run here reads as the monitor."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        join_netns(netns)
        try:
            yield
        finally:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(home, CLONE_NEWNET) != 0:  # cannot happen as root; never go on
                os.write(2, b"cannot return to the root network namespace\n")
                os._exit(70)
    finally:
        os.close(home)


def in_netns(netns: str, fn: Callable[[], T], timeout: float = 60.0) -> T:
    """``fn()`` run on a thread that joined ``netns`` first (a network namespace is per
    thread), so the test process reads the monitor's view without a subprocess."""
    out: list = []
    err: list[BaseException] = []

    def run() -> None:
        try:
            join_netns(netns)
            out.append(fn())
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            err.append(e)

    t = threading.Thread(target=run, name=f"in-{netns}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"{getattr(fn, '__name__', 'call')} in {netns} did not return "
                           f"within {timeout} s")
    if err:
        raise err[0]
    return out[0]


def namespaces_left(tag: str) -> list[str]:
    listed = _ip("netns", "list", check=False).stdout.split("\n")
    return [line.split()[0] for line in listed if line.startswith(tag)]


@contextmanager
def module_lab(hosts: int = 2) -> Iterator[Lab]:
    """A lab for one test module. Where namespaces cannot be made the test fails (the suite
    runs as root on Linux by design), and on the way out none of the lab's may be left."""
    import pytest

    try:
        made = Lab(hosts).__enter__()
    except LabUnavailable as e:
        pytest.fail(f"multi-host tests cannot make network namespaces here: {e}")
    try:
        yield made
    finally:
        made.close()
        assert namespaces_left(made.tag) == [], "network namespaces left behind"
