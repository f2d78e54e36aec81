"""The contract between the instrumentor and vLLM's internals, checked before anything is wrapped.

The instrumentor wraps private methods of vLLM's ``DPEngineCoreProc`` and
``ParallelConfig.sync_dp_state``. Private names change between releases, so activation first
resolves every one of them and reads, from the loaded vLLM itself, what each release line
differs in (:mod:`.versions` has the table for 0.21-0.33 and the rule for other versions):

- the sync cadence: ``_has_global_unfinished_reqs`` reads ``dp_sync_interval`` (0.30+, with a
  sync on step 1; the live engine must then have the attribute) or the constant 32 (0.21-0.29);
- the ``sync_dp_state`` flavour: ``staticmethod`` on ``torch.distributed.all_reduce`` or an
  instance method on vLLM's ``cpu_all_reduce_`` (0.33);
- the pause entry point: ``pause_scheduler``, or 0.33's ``pause_generation`` utility, which must
  call ``pause_scheduler`` (that is where a pause is seen);
- ``run_busy_loop`` under 0.27+'s ``fault_tolerant_wrapper`` (a retry re-enters the loop inside
  our wrapper, so one observer spans retries);
- optional methods wrapped when present (0.33's ``_reject_add_while_paused``).

On any mismatch it raises ONE :class:`ContractError` naming everything that is missing, with a
bounded ``reason`` for the ``vllm_dp_plugin_active`` gauge, and nothing is wrapped (never
half-wrapped, never a broken engine). Instance attributes (``pending_pause``, ...) only exist
on a live engine, so :func:`missing_instance_attributes` checks them when its busy loop starts.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from types import ModuleType
from typing import Any

from instrumented_core.vllm_support import versions
from instrumented_core.vllm_support.versions import CADENCE_FIXED, CADENCE_INTERVAL

__all__ = [
    "CADENCE_ATTRIBUTE",
    "ENGINE_ATTRIBUTES",
    "ENGINE_METHODS",
    "OPTIONAL_ENGINE_METHODS",
    "REASONS",
    "ContractError",
    "VllmApi",
    "missing_instance_attributes",
    "resolve",
]

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
#: Methods wrapped when the release has them.
OPTIONAL_ENGINE_METHODS = (
    "_reject_add_while_paused",  # 0.33: a request rejected with ``engine_paused``
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
    "dp_rank",
    "dp_size",
    "engine_index",
    "vllm_config",
)
#: Required on a live engine only where the cadence comes from it (0.30+).
CADENCE_ATTRIBUTE = "dp_sync_interval"

#: Bounded ``reason`` label values of ``vllm_dp_plugin_active`` (see names.PLUGIN_REASONS).
REASON_OK = "ok"
REASON_UNKNOWN_VERSION = "unknown_version"  # active, on a version nobody checked
REASON_UNKNOWN_VERSION_OFF = "unknown_version_off"  # structure holds, policy says off
REASON_NO_TWO_PHASE = "no_two_phase_pause"  # a vLLM before 0.21 (one-phase pause only)
REASON_CONTRACT = "contract_mismatch"  # a wrapped name or behaviour is missing
REASON_ENGINE = "engine_mismatch"  # the live engine lacks an attribute the observer reads
REASON_TELEMETRY = "telemetry_error"  # the engine's telemetry failed to start
REASONS = (REASON_OK, REASON_UNKNOWN_VERSION, REASON_UNKNOWN_VERSION_OFF, REASON_NO_TWO_PHASE,
           REASON_CONTRACT, REASON_ENGINE, REASON_TELEMETRY)

_CORE = "vllm.v1.engine.core"
_ENGINE_PKG = "vllm.v1.engine"
_CONFIG = "vllm.config"


class ContractError(RuntimeError):
    """vLLM's internals differ from what the instrumentor wraps; the message names them."""

    def __init__(self, message: str, reason: str = REASON_CONTRACT,
                 version: str = "unknown") -> None:
        super().__init__(message)
        self.reason = reason
        self.version = version


@dataclass
class VllmApi:
    """Everything the instrumentor touches, resolved once."""

    version: str
    engine_cls: type
    parallel_config_cls: type
    start_dp_wave: Any
    #: ``"static"`` (0.21-0.32: staticmethod + torch.distributed.all_reduce) or ``"method"``.
    sync_flavour: str
    #: ``(namespace, attribute)`` of the all-reduce ``sync_dp_state`` calls, swapped for a
    #: pass-through that records the summed votes during the call; None: votes inferred.
    reduce_hook: tuple[Any, str] | None = None
    notes: list[str] = field(default_factory=list)
    #: ``fixed32`` (0.21-0.29) or ``dp_sync_interval`` (0.30+): see :mod:`.versions`.
    cadence: str = CADENCE_INTERVAL
    #: ``pause_scheduler`` or ``pause_generation`` (which calls pause_scheduler)
    pause_entry: str = "pause_scheduler"
    #: ``run_busy_loop`` is 0.27+'s ``fault_tolerant_wrapper`` (retries inside our wrapper)
    fault_tolerant_loop: bool = False
    #: ``OPTIONAL_ENGINE_METHODS`` this release has (wrapped too)
    optional_methods: tuple[str, ...] = ()
    #: ``ok``, or ``unknown_version`` when active on a version not in ``KNOWN_LINES``
    reason: str = REASON_OK

    @property
    def known(self) -> bool:
        return self.reason == REASON_OK

    @property
    def step_one_sync(self) -> bool:
        return self.cadence == CADENCE_INTERVAL

    def capabilities(self) -> dict[str, Any]:
        """What was read from the loaded vLLM (the columns of the versions table)."""
        return {"cadence": self.cadence, "sync_flavour": self.sync_flavour,
                "pause_entry": self.pause_entry, "fault_tolerant_loop": self.fault_tolerant_loop,
                "rejects_paused": "_reject_add_while_paused" in self.optional_methods}


def _reduce_hook(sync_fn: Callable, flavour: str) -> tuple[Any, str] | None:
    """Where ``sync_dp_state`` looks its all-reduce up at call time, if we can tell."""
    fn_globals = getattr(sync_fn, "__globals__", {})
    if flavour == "method" and callable(fn_globals.get("cpu_all_reduce_")):
        mod_name = fn_globals.get("__name__")
        try:
            module = importlib.import_module(mod_name) if mod_name else None
        except Exception:  # noqa: BLE001 - no hook: the votes are inferred
            return None
        if module is not None and getattr(module, "cpu_all_reduce_", None) is not None:
            return module, "cpu_all_reduce_"
        return None
    torch_mod = fn_globals.get("torch")
    dist = getattr(torch_mod, "distributed", None)
    if dist is not None and callable(getattr(dist, "all_reduce", None)):
        return dist, "all_reduce"
    return None


def _code_names(fn: Any) -> tuple[set[str], set[Any]] | None:
    """``(names, constants)`` of a plain function's code; None when it has no readable code."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    consts = {c for c in code.co_consts if isinstance(c, (int, str)) and not isinstance(c, bool)}
    return set(code.co_names), consts


def _field_names(cls: type) -> set[str]:
    if is_dataclass(cls):
        return {f.name for f in fields(cls)}
    return set(getattr(cls, "model_fields", {}) or {})


def cadence_of(engine_cls: type, pc_cls: type | None,
               line: versions.ReleaseLine | None) -> tuple[str | None, str]:
    """The sync cadence and where it was read from.

    In order: the code of ``_has_global_unfinished_reqs`` (reads ``dp_sync_interval``, or the
    constant 32); a ``ParallelConfig.dp_sync_interval`` field; the known line's table entry.
    """
    fn = getattr(engine_cls, "_has_global_unfinished_reqs", None)
    code = _code_names(fn)
    if code is not None:
        names, consts = code
        if CADENCE_ATTRIBUTE in names:
            return CADENCE_INTERVAL, "its code reads dp_sync_interval"
        if versions.FIXED_SYNC_INTERVAL in consts and "step_counter" in names:
            return CADENCE_FIXED, "its code syncs every 32 steps"
    if pc_cls is not None and CADENCE_ATTRIBUTE in _field_names(pc_cls):
        return CADENCE_INTERVAL, "ParallelConfig has dp_sync_interval"
    if line is not None:
        return line.cadence, "the known-release table"
    return None, "neither its code nor ParallelConfig says"


def _pause_entry(engine_cls: type) -> tuple[str | None, str]:
    gen = getattr(engine_cls, "pause_generation", None)
    if gen is None:
        return "pause_scheduler", ""
    code = _code_names(gen)
    if code is None or "pause_scheduler" in code[0]:
        return "pause_generation", ""
    return None, ("DPEngineCoreProc.pause_generation calling pause_scheduler (it does not: "
                  "pauses would not be seen)")


def _is_fault_tolerant(fn: Any) -> bool:
    return "fault_tolerant" in str(getattr(fn, "__qualname__", ""))


def resolve(import_module: Callable[[str], ModuleType] = importlib.import_module,
            env: Mapping[str, str] | None = None) -> VllmApi:
    """Resolve vLLM's names or raise :class:`ContractError` listing everything missing.

    ``import_module`` is replaceable so tests can check the contract against a fake vLLM;
    ``env`` (default ``os.environ``) holds ``INSTRUMENTED_CORE_VLLM_UNKNOWN_VERSION``.
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
    line = versions.known_line(version)
    core, engine_pkg, config = load(_CORE), load(_ENGINE_PKG), load(_CONFIG)

    engine_cls = getattr(core, "DPEngineCoreProc", None) if core is not None else None
    if core is not None and engine_cls is None:
        missing.append(f"{_CORE}.DPEngineCoreProc")
    pc_cls = getattr(config, "ParallelConfig", None) if config is not None else None
    if config is not None and pc_cls is None:
        missing.append(f"{_CONFIG}.ParallelConfig")

    two_phase = True
    if engine_cls is not None and pc_cls is not None and (
            "_pause_complete" not in engine_cls.__dict__
            and inspect.getattr_static(pc_cls, "sync_dp_state", None) is None):
        # 0.20.x and earlier: the one-phase pause, nothing to observe
        two_phase = False
        missing.append("the two-phase pause (DPEngineCoreProc._pause_complete, "
                       "ParallelConfig.sync_dp_state: vLLM 0.21 or later)")

    cadence = pause_entry = None
    optional: tuple[str, ...] = ()
    if engine_cls is not None and two_phase:
        for name in ENGINE_METHODS + ENGINE_REQUIRED_ONLY:
            if not callable(getattr(engine_cls, name, None)):
                missing.append(f"DPEngineCoreProc.{name}")
        optional = tuple(name for name in OPTIONAL_ENGINE_METHODS
                         if callable(getattr(engine_cls, name, None)))
        cadence, source = cadence_of(engine_cls, pc_cls, line)
        if cadence is None:
            missing.append(f"a sync cadence for _has_global_unfinished_reqs ({source})")
        pause_entry, problem = _pause_entry(engine_cls)
        if problem:
            missing.append(problem)

    flavour = ""
    sync_fn = None
    if pc_cls is not None and two_phase:
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
        reason = REASON_CONTRACT if two_phase else REASON_NO_TWO_PHASE
        raise ContractError(
            f"vLLM {version} does not match what the instrumented_core instrumentor wraps; "
            f"missing: {'; '.join(missing)}. Instrumentation stays OFF (vLLM runs unchanged).",
            reason, version)
    reason = REASON_OK
    if line is None:
        try:
            policy = versions.unknown_version_policy(env)
        except ValueError as e:
            raise ContractError(f"vLLM {version}: {e}. Instrumentation stays OFF (vLLM runs "
                                f"unchanged).", REASON_UNKNOWN_VERSION_OFF, version) from None
        if policy == "off":
            raise ContractError(
                f"vLLM {version} is not a release line instrumented_core has checked "
                f"({_known_range()}); its structure matches, but "
                f"{versions.ENV_UNKNOWN_VERSION}=off. Instrumentation stays OFF (vLLM runs "
                f"unchanged); unset it (or set activate) to instrument this version.",
                REASON_UNKNOWN_VERSION_OFF, version)
        reason = REASON_UNKNOWN_VERSION
    assert engine_cls is not None and pc_cls is not None and cadence and pause_entry
    api = VllmApi(version, engine_cls, pc_cls, start, flavour, cadence=cadence,
                  pause_entry=pause_entry,
                  fault_tolerant_loop=_is_fault_tolerant(engine_cls.run_busy_loop),
                  optional_methods=optional, reason=reason)
    api.reduce_hook = _reduce_hook(sync_fn, flavour) if sync_fn is not None else None
    if api.reduce_hook is None:
        api.notes.append("sync_dp_state's all-reduce not found: pause votes are inferred "
                         "from the call's inputs and result")
    return api


def _known_range() -> str:
    lines = sorted(versions.KNOWN_LINES)
    first, last = lines[0], lines[-1]
    return f"{first[0]}.{first[1]} to {last[0]}.{last[1]}"


def missing_instance_attributes(engine: Any, api: VllmApi | None = None) -> list[str]:
    """Attributes the observer reads that a live engine lacks (empty when the contract holds):
    ``ENGINE_ATTRIBUTES``, plus ``dp_sync_interval`` where the cadence comes from it."""
    names: tuple[str, ...] = ENGINE_ATTRIBUTES
    if api is None or api.cadence == CADENCE_INTERVAL:
        names = names + (CADENCE_ATTRIBUTE,)
    return [name for name in names if not hasattr(engine, name)]
