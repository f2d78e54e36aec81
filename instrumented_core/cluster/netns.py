"""A multi-host lab on one machine: "hosts" as Linux network namespaces on one bridge.

``instrumented-core demo --hosts N`` and the multi-host tests build it. Topology (everything
lives inside namespaces this module creates; the root namespace gets no interface, no address
and no route, so nothing outside the lab can see its private /24)::

    monitor ns:  br0 = 10.N.M.1/24   (the demo's live view and doctor; Prometheus in tests)
        |- vh1 <-veth-> host1 ns: eth0 = 10.N.M.11   (ranks 0..k-1)
        |- vh2 <-veth-> host2 ns: eth0 = 10.N.M.12   (ranks k..)

Names are unique per run (``icnet-<pid>-<rand>-mon`` ...), and :meth:`Lab.close` removes every
namespace it made (deleting a namespace removes its veths and the bridge with it); use it as
a context manager so a failing or stopped run still cleans up. A run killed before its
clean-up (SIGKILL) is recognised by the dead pid in its names and swept when the next lab is
built (:func:`sweep_stale`).

Only the plumbing lives here: making and removing namespaces, the bridge, the veths and the
addresses, running in a namespace, the sweep. Fault injection on the lab (partition, a cut
monitor path, a slow link) is test-only and lives in ``tests/netns.py``, which builds on this
module: the production wheel never ships a way to break a network.
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

#: Every namespace a lab makes is named ``<PREFIX><pid>-<random>-...``: unique per run, and a
#: run killed before its clean-up (SIGKILL by a timeout) is recognised by its dead pid.
PREFIX = "icnet-"


class LabUnavailable(RuntimeError):
    """Network namespaces cannot be made here; the message says why and what is needed."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20,
                          check=check)


def check_available(who: str = "the multi-host tests") -> None:
    """Raise :class:`LabUnavailable` (one line naming the need and the fix) unless network
    namespaces can be made here; ``who`` names what needs them in that line."""
    if shutil.which("ip") is None:
        raise LabUnavailable(f"{who}: iproute2's `ip` is not installed: install it "
                             "(apt-get install iproute2)")
    if os.geteuid() != 0:
        raise LabUnavailable(f"{who}: network namespaces need root (CAP_NET_ADMIN, "
                             "CAP_SYS_ADMIN): run it as root (sudo)")
    name = f"icchk{os.getpid()}"
    r = _ip("netns", "add", name, check=False)
    if r.returncode != 0:
        reason = " ".join(r.stderr.split()) or f"exit {r.returncode}"
        raise LabUnavailable(f"{who}: network namespaces cannot be made here (`ip netns add`: "
                             f"{reason}): run as root with CAP_SYS_ADMIN and CAP_NET_ADMIN, "
                             "in a container that allows namespaces (e.g. docker run "
                             "--privileged)")
    _ip("netns", "del", name, check=False)


def _end_processes_in(ns: str) -> None:
    """SIGKILL what still runs inside one of our namespaces (children that escaped their
    own clean-up); nothing outside it is touched."""
    r = _ip("netns", "pids", ns, check=False)
    for pid in r.stdout.split():
        try:
            if int(pid) != os.getpid():
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


def namespaces_left(tag: str) -> list[str]:
    """The namespaces whose names start with ``tag`` (a lab's: none once it is closed)."""
    listed = _ip("netns", "list", check=False).stdout.split("\n")
    return [line.split()[0] for line in listed if line.startswith(tag)]


@dataclass
class Host:
    index: int
    netns: str
    address: str
    port: str  # the bridge-side veth in the monitor namespace


@dataclass
class Lab:
    """``hosts_count`` hosts and a monitor on one bridge. Names and addresses are decided
    when the object is made (a cluster's placement can be planned before anything exists);
    entering it builds the namespaces, :meth:`close` removes them."""

    hosts_count: int = 2
    tag: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}-{secrets.token_hex(2)}")
    hosts: list[Host] = field(default_factory=list)
    monitor: str = ""
    subnet: str = ""
    _made: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # 10.<200-249>.<0-255>: a private /24 per run; it exists only inside these namespaces
        self.subnet = self.subnet or f"10.{200 + os.getpid() % 50}.{secrets.randbelow(256)}"
        self.monitor = self.monitor or f"{self.tag}-mon"
        if not self.hosts:
            self.hosts = [Host(i, f"{self.tag}-h{i + 1}", f"{self.subnet}.{11 + i}",
                               f"vh{i + 1}") for i in range(self.hosts_count)]

    def __enter__(self) -> Lab:
        return self.build()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def monitor_address(self) -> str:
        return f"{self.subnet}.1"

    def build(self, who: str = "the multi-host tests") -> Lab:
        """Make the namespaces (after sweeping stale ones); on any failure, or a signal
        raised meanwhile, what was made is removed before the error propagates."""
        check_available(who)
        sweep_stale()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        _ip("netns", "add", self.monitor)
        self._made.append(self.monitor)
        m = ("-n", self.monitor)
        _ip(*m, "link", "set", "lo", "up")
        _ip(*m, "link", "add", "br0", "type", "bridge")
        _ip(*m, "addr", "add", f"{self.monitor_address}/24", "dev", "br0")
        _ip(*m, "link", "set", "br0", "up")
        for host in self.hosts:
            _ip("netns", "add", host.netns)
            self._made.append(host.netns)
            _ip(*m, "link", "add", host.port, "type", "veth", "peer", "name", "eth0",
                "netns", host.netns)
            _ip(*m, "link", "set", host.port, "master", "br0")
            _ip(*m, "link", "set", host.port, "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.netns, "link", "set", "eth0", "up")

    def close(self) -> None:
        """Remove every namespace this lab made (idempotent); processes still inside are
        killed first (never the calling process)."""
        for ns in reversed(self._made):
            _end_processes_in(ns)
            _ip("netns", "del", ns, check=False)
        self._made.clear()

    # -- placement --------------------------------------------------------------------------

    def rank_hosts(self, ranks: int) -> tuple[RankHost, ...]:
        """Ranks spread in blocks over the hosts (ranks 0..k-1 on the first host ...), the
        layout of vLLM's ``--data-parallel-size-local``; block sizes differ by at most one,
        so with at least as many ranks as hosts every host runs one."""
        at = [self.hosts[r * len(self.hosts) // ranks] for r in range(ranks)]
        return tuple(RankHost(h.netns, h.address) for h in at)

    def exec_argv(self, netns: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", netns, *argv]


def enter_netns(netns: str) -> int:
    """Move the calling thread into ``netns``; returns a handle on where it was, for
    :func:`leave_netns`. Threads and processes it starts meanwhile inherit ``netns``."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        join_netns(netns)
    except BaseException:
        os.close(home)
        raise
    return home


def leave_netns(home: int) -> None:
    """Back to the namespace :func:`enter_netns` left (and close its handle)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(home, CLONE_NEWNET) != 0:  # cannot happen as root; never go on
            os.write(2, b"cannot return to the root network namespace\n")
            os._exit(70)
    finally:
        os.close(home)


@contextmanager
def inside(netns: str) -> Iterator[None]:
    """The calling thread inside ``netns`` for the block, then back where it was (its saved
    namespace, even on error). Threads and processes it starts inside inherit ``netns``: a
    Prometheus started here runs on the monitor host, a doctor run here reads as the monitor."""
    home = enter_netns(netns)
    try:
        yield
    finally:
        leave_netns(home)


def in_netns(netns: str, fn: Callable[[], T], timeout: float = 60.0) -> T:
    """``fn()`` run on a thread that joined ``netns`` first (a network namespace is per
    thread), so the calling process reads the monitor's view without a subprocess."""
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
