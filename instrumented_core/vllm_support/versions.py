"""The vLLM release lines the instrumentor knows, what each one has, and the rule for the rest.

The contract (:mod:`.contract`) decides by capability: it reads the loaded vLLM's own classes
and code objects (does ``_has_global_unfinished_reqs`` read ``dp_sync_interval`` or the
constant 32, is ``sync_dp_state`` a static or an instance method, does ``pause_generation``
call ``pause_scheduler``, ...). ``KNOWN_LINES`` is what the released wheels' own source says
for every line from 0.21 (``tests/test_vllm_versions.py`` reads it again from the downloaded
wheels); the contract uses it only where a loaded vLLM cannot tell (a function whose code it
cannot read) and to tell a line somebody checked from one nobody has.

The rule for the version string (it never decides alone):

- a line in ``KNOWN_LINES`` whose structure holds: active;
- any other version (newer than 0.33, a fork, a backport onto an older line, an unparsable
  string) whose WHOLE structural contract holds: active with one warning, unless
  ``INSTRUMENTED_CORE_VLLM_UNKNOWN_VERSION=off``; with ``off`` it stays off with one error;
- any version whose structure does not hold: off with one error that names what is missing,
  and ``vllm_dp_plugin_active{reason=...} 0`` on the rank's endpoint.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "CADENCE_FIXED",
    "CADENCE_INTERVAL",
    "ENV_UNKNOWN_VERSION",
    "FIXED_SYNC_INTERVAL",
    "KNOWN_LINES",
    "ReleaseLine",
    "known_line",
    "line_of",
    "steps_until_sync",
    "unknown_version_policy",
]

#: ``activate`` (default) or ``off``: what to do on a vLLM version not in ``KNOWN_LINES``
#: whose whole structural contract holds.
ENV_UNKNOWN_VERSION = "INSTRUMENTED_CORE_VLLM_UNKNOWN_VERSION"
UNKNOWN_VERSION_POLICIES = ("activate", "off")

#: 0.21-0.29: ``if self.step_counter % 32 != 0: return True`` (no attribute, no flag, no env).
FIXED_SYNC_INTERVAL = 32
#: Sync cadences: a hard-coded 32 without a step-1 sync, or ``dp_sync_interval`` with one.
CADENCE_FIXED = "fixed32"
CADENCE_INTERVAL = "dp_sync_interval"


@dataclass(frozen=True)
class ReleaseLine:
    """What one release line has, as its released wheel's source says."""

    #: ``fixed32`` (0.21-0.29) or ``dp_sync_interval`` (0.30+, with a sync on step 1)
    cadence: str
    #: ``static`` (staticmethod on ``torch.distributed.all_reduce``) or ``method`` (0.33:
    #: instance method on vLLM's ``cpu_all_reduce_``, Gloo point-to-point with a timeout)
    sync_flavour: str
    #: ``pause_scheduler`` or ``pause_generation`` (0.33: a utility that calls it)
    pause_entry: str
    #: ``run_busy_loop`` wrapped by ``fault_tolerant_wrapper`` (0.27+; no functools.wraps)
    fault_tolerant_loop: bool
    #: new requests rejected with ``engine_paused`` while paused (0.33)
    rejects_paused: bool

    @property
    def step_one_sync(self) -> bool:
        return self.cadence == CADENCE_INTERVAL


def _line(cadence: str, flavour: str = "static", entry: str = "pause_scheduler",
          ft: bool = False, rejects: bool = False) -> ReleaseLine:
    return ReleaseLine(cadence, flavour, entry, ft, rejects)


_F, _I = CADENCE_FIXED, CADENCE_INTERVAL
#: Every release line with the two-phase pause (it first ships in 0.21.0; 0.20.x has only the
#: one-phase pause). Patch releases of a line (0.22.1, 0.25.1, 0.27.1) have the same engine
#: and config source as its .0.
KNOWN_LINES: Mapping[tuple[int, int], ReleaseLine] = {
    (0, 21): _line(_F),
    (0, 22): _line(_F),
    (0, 23): _line(_F),
    (0, 24): _line(_F),
    (0, 25): _line(_F),
    (0, 26): _line(_F),
    (0, 27): _line(_F, ft=True),
    (0, 28): _line(_F, ft=True),
    (0, 29): _line(_F, ft=True),
    (0, 30): _line(_I, ft=True),
    (0, 31): _line(_I, ft=True),
    (0, 32): _line(_I, ft=True),
    (0, 33): _line(_I, "method", "pause_generation", ft=True, rejects=True),
}

_VERSION = re.compile(r"^\s*v?(\d+)\.(\d+)")


def line_of(version: str) -> tuple[int, int] | None:
    """``(major, minor)`` of a version string (``0.33.1.dev3+g1234`` -> ``(0, 33)``)."""
    m = _VERSION.match(str(version))
    return (int(m.group(1)), int(m.group(2))) if m else None


def known_line(version: str) -> ReleaseLine | None:
    line = line_of(version)
    return KNOWN_LINES.get(line) if line is not None else None


def unknown_version_policy(env: Mapping[str, str] | None = None) -> str:
    """``activate`` or ``off`` (from ``INSTRUMENTED_CORE_VLLM_UNKNOWN_VERSION``).

    Raises ``ValueError`` naming the variable and its choices on any other value."""
    env = os.environ if env is None else env
    raw = env.get(ENV_UNKNOWN_VERSION, "").strip().lower() or "activate"
    if raw not in UNKNOWN_VERSION_POLICIES:
        raise ValueError(f"{ENV_UNKNOWN_VERSION}={env.get(ENV_UNKNOWN_VERSION)!r}: choose "
                         f"{' or '.join(UNKNOWN_VERSION_POLICIES)}")
    return raw


def steps_until_sync(step_counter: int, interval: int, step_one_sync: bool) -> int:
    """Steps until the next ``sync_dp_state`` all-reduce of a wave.

    With ``dp_sync_interval`` (0.30+) vLLM also syncs on step 1, so an idle rank at step 0
    is one step away; with the fixed 32 (0.21-0.29) it is 32 steps away."""
    if step_counter == 0 and step_one_sync:
        return 1
    return interval - step_counter % interval
