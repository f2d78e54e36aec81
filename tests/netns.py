"""The multi-host lab for tests and benchmarks: the package's lab
(:mod:`instrumented_core.cluster.netns`, which ``instrumented-core demo --hosts`` builds too)
plus the faults a test injects on it.

Faults are real network operations: a link set down (host partition), an ``unreachable``
route in the monitor only (the monitor's path to one host cut while the hosts still talk), and
a token bucket (``tbf``) on a host's link: this kernel has no ``netem``, so the slow link is a
rate limit whose queue delays every packet.

Test/benchmark-only: fault injection is not part of the installed package.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

from instrumented_core.cluster import netns as _netns
from instrumented_core.cluster.netns import (  # noqa: F401 - the tests' names for the lab
    PREFIX,
    Host,
    LabUnavailable,
    check_available,
    in_netns,
    inside,
    namespaces_left,
    sweep_stale,
)

_ip = _netns._ip


class Lab(_netns.Lab):
    """The package's lab with fault injection."""

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
