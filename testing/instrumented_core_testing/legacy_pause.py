"""TEST-ONLY vLLM plugin: put back the one-phase DP pause of vLLM before PR #39366.

It reproduces vLLM issue #36594 on a real engine so tests (and demos) can show what our
telemetry and ``doctor`` report while it hangs. Inert unless ``IC_LEGACY_ONE_PHASE_PAUSE=1``
is set in the environment of the process that starts vLLM (engine cores inherit it). Never
enable it in production: it re-introduces the deadlock.

With it active, in every engine-core process:

- ``DPEngineCoreProc._pause_complete`` is the base ``EngineCoreProc._pause_complete``
  (``not self.has_work()``): an idle rank pauses at once, without the consensus round;
- ``DPEngineCoreProc._handle_client_request`` clears ``ignore_start_dp_wave`` before a
  ``START_DP_WAVE``, so the message is always honoured and can wake a paused rank.

``DPEngineCoreProc`` is marked with ``_instrumented_core_legacy_one_phase = True`` so the
instrumentor labels the rank's protocol ``legacy``. Registered as::

    [project.entry-points."vllm.general_plugins"]
    instrumented_core_legacy_pause = "instrumented_core_testing.legacy_pause:register"

``register()`` also loads the other test-only fault (:mod:`.faults`, a stalled sync round).
It is idempotent and never raises into vLLM; ``uninstall()`` restores vLLM.
"""

from __future__ import annotations

import logging
import os
from typing import Any

__all__ = ["ENV_ENABLE", "enabled_by_env", "install", "register", "uninstall"]

log = logging.getLogger(__name__)

#: Environment variable that enables the plugin (test-only).
ENV_ENABLE = "IC_LEGACY_ONE_PHASE_PAUSE"
_LEGACY_MARK = "_instrumented_core_legacy_one_phase"
_saved: dict[str, Any] = {}


def enabled_by_env(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return env.get(ENV_ENABLE, "").strip() == "1"


def install() -> bool:
    """Patch ``DPEngineCoreProc`` now (no env check). False when already installed."""
    from vllm.v1.engine import EngineCoreRequestType
    from vllm.v1.engine import core as core_mod

    dp_cls = core_mod.DPEngineCoreProc
    if dp_cls.__dict__.get(_LEGACY_MARK):
        return False
    start_dp_wave = EngineCoreRequestType.START_DP_WAVE
    orig_handle = dp_cls._handle_client_request

    def _handle_client_request(self, request_type, request, *args, **kwargs):
        if request_type == start_dp_wave and self.ignore_start_dp_wave:
            log.debug("legacy pause: engine %s honours START_DP_WAVE %r while paused",
                      self.engine_index, request)
            self.ignore_start_dp_wave = False
        return orig_handle(self, request_type, request, *args, **kwargs)

    _saved["_pause_complete"] = dp_cls.__dict__.get("_pause_complete")
    _saved["_handle_client_request"] = dp_cls.__dict__.get("_handle_client_request")
    dp_cls._pause_complete = core_mod.EngineCoreProc._pause_complete
    dp_cls._handle_client_request = _handle_client_request
    setattr(dp_cls, _LEGACY_MARK, True)
    return True


def uninstall() -> None:
    """Restore vLLM's two-phase pause (tests)."""
    from vllm.v1.engine import core as core_mod

    dp_cls = core_mod.DPEngineCoreProc
    if not dp_cls.__dict__.get(_LEGACY_MARK):
        return
    for name, original in _saved.items():
        if original is None:
            delattr(dp_cls, name)
        else:
            setattr(dp_cls, name, original)
    delattr(dp_cls, _LEGACY_MARK)
    _saved.clear()


def register() -> None:
    """``vllm.general_plugins`` entry point for the test-only faults: the legacy pause when
    ``IC_LEGACY_ONE_PHASE_PAUSE=1``, and the sync stall of :mod:`.faults` when configured."""
    from instrumented_core_testing import faults

    faults.register()
    if not enabled_by_env():
        return
    try:
        if install():
            log.warning("TEST-ONLY legacy one-phase DP pause installed in pid %d (vLLM issue "
                        "#36594 can now deadlock)", os.getpid())
    except Exception:
        log.exception("legacy pause plugin failed; vLLM left unchanged")
