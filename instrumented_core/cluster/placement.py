"""Where the CPU cluster's ranks run when they span "hosts" (Linux network namespaces).

Each rank process joins its host's network namespace first thing, before any socket or
thread exists, so its Gloo connections and its ``/metrics`` endpoint live on that host's
address; the control plane (client, coordinator, status board) stays on pipes and shared
memory, as vLLM's stays on its own ZMQ sockets. Naming (see README "Multi-node"): a rank's
metrics port is ``port base + global DP rank`` on its host's address, the same rule as on one
host, so a target's port names its rank on any host and two hosts never need different
bases.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"


@dataclass(frozen=True)
class RankHost:
    """A rank's host: the network namespace it joins, the address it serves and connects
    from, and the interface Gloo binds (``GLOO_SOCKET_IFNAME``)."""

    netns: str
    address: str
    ifname: str = "eth0"


def join_netns(name: str) -> None:
    """Move the calling thread (and every thread or socket it creates later) into the named
    network namespace (``ip netns add`` made it); raises OSError with the reason."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot join network namespace {name!r}: {os.strerror(err)}")
    finally:
        os.close(fd)
