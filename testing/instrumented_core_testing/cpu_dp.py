"""Opt-in vLLM general plugin: data-parallel MoE on CPU (Gloo).

Why this exists
---------------
With ``data_parallel_size > 1`` vLLM always builds the all-gather / reduce-scatter all2all
manager (``AgRsAll2AllManager``) for MoE layers. On the CPU platform the communicator is
``CpuCommunicator``, which inherits ``all_gatherv`` and ``reduce_scatterv`` from
``DeviceCommunicatorBase``, where both raise ``NotImplementedError``. The first MoE forward
(a real or a dummy batch) then fails in the worker, and an idle ``pause_generation()`` on a
DP engine never returns (the two-phase pause needs one dummy step). vLLM 0.32.0 is affected.

What it does
------------
``register()`` installs the two missing methods on ``CpuCommunicator`` (only where vLLM
itself does not define them), built on ``torch.distributed`` over the communicator's Gloo
``device_group``:

- ``all_gatherv(input_, dim=0, sizes=None)``: pad every rank's chunk to ``max(sizes)``,
  ``all_gather`` the padded chunks, then concatenate the first ``sizes[r]`` rows of each.
  Accepts a tensor or a list of tensors (the AgRs manager gathers hidden states, top-k
  weights and ids in one call) and returns the same shape of result.
- ``reduce_scatterv(input_, dim=-1, sizes=None)``: ``all_reduce`` (SUM) a copy of the input,
  then return this rank's slice (``sizes[rank]`` rows at offset ``sum(sizes[:rank])``; equal
  chunks when ``sizes`` is None). ``reduce_scatterv_into_output`` (inherited) uses it.

Both cost more than a true v-collective (they move ``world_size x max(sizes)`` rows and a full
all-reduce), which is irrelevant for the tiny test models this is meant for.

It also asks Linux for permission to use AMX tile data in the process
(``torch.cpu._init_amx()``, i.e. ``arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)``). On a CPU with
AMX, vLLM's CPU attention picks its AMX kernel for bfloat16, but nothing in vLLM 0.32.0 requests
that permission; whether the worker survives its first forward then depends on whether oneDNN
happened to request it first, and otherwise the worker dies of ``SIGILL`` (exit code -4, seen
here on 3 of 5 engine starts on an AMX-capable Xeon VM). Without AMX the call is a no-op.

Activation
----------
vLLM calls every entry point of the group ``vllm.general_plugins`` once per process: in the
front end (``EngineArgs``), in every engine-core process (``EngineCore.__init__``) and in every
worker process (``WorkerBase.init_worker``), which is where the MoE layers run. The package
registers this function as::

    [project.entry-points."vllm.general_plugins"]
    instrumented_core_cpu_dp = "instrumented_core_testing.cpu_dp:register"

The plugin is opt-in: ``register()`` does nothing unless the environment variable
``INSTRUMENTED_CORE_VLLM_CPU_DP`` is ``1`` / ``true`` / ``on`` / ``yes`` (set it in the parent
process; vLLM's spawned engine-core and worker processes inherit it). ``VLLM_PLUGINS``, when
set, is an allow-list of entry-point names: include ``instrumented_core_cpu_dp`` in it. In a
single process (tests) ``install()`` patches unconditionally.

``register()`` is idempotent and never raises into vLLM: on any failure it logs one error and
leaves vLLM untouched.
"""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

#: Environment variable that enables the plugin (opt-in).
ENV_ENABLE = "INSTRUMENTED_CORE_VLLM_CPU_DP"
#: Entry-point name under ``vllm.general_plugins``.
ENTRY_POINT_NAME = "instrumented_core_cpu_dp"

_MARK = "_instrumented_core_cpu_dp"
_TRUE = {"1", "true", "on", "yes"}
_error_logged = False


def enabled_by_env(environ: dict[str, str] | None = None) -> bool:
    """True when ``INSTRUMENTED_CORE_VLLM_CPU_DP`` asks for the plugin."""
    env = os.environ if environ is None else environ
    return env.get(ENV_ENABLE, "").strip().lower() in _TRUE


def _all_gatherv(
    self: Any,
    input_: Any,
    dim: int = 0,
    sizes: list[int] | None = None,
) -> Any:
    """``all_gatherv`` for ``CpuCommunicator`` on Gloo (pad, all_gather, trim)."""
    import torch
    import torch.distributed as dist

    world_size = self.world_size
    rank = self.rank_in_group
    group = self.device_group

    def gather_one(t: torch.Tensor) -> torch.Tensor:
        d = dim + t.dim() if dim < 0 else dim
        if world_size == 1:
            return t
        x = t.movedim(d, 0) if d != 0 else t
        local_n = x.shape[0]
        if sizes is None:
            per_rank = [local_n] * world_size
        else:
            if len(sizes) != world_size:
                raise ValueError(f"all_gatherv: len(sizes)={len(sizes)} != {world_size}")
            if sizes[rank] != local_n:
                raise ValueError(f"all_gatherv: sizes[{rank}]={sizes[rank]} != {local_n}")
            per_rank = list(sizes)
        max_n = max(per_rank)
        padded = x.new_zeros((max_n,) + tuple(x.shape[1:]))
        if local_n:
            padded[:local_n].copy_(x)
        chunks = [torch.empty_like(padded) for _ in range(world_size)]
        dist.all_gather(chunks, padded, group=group)
        out = torch.cat([c[:n] for c, n in zip(chunks, per_rank)], dim=0)
        return out.movedim(0, d).contiguous() if d != 0 else out

    if isinstance(input_, (list, tuple)):
        return [gather_one(t) for t in input_]
    return gather_one(input_)


def _reduce_scatterv(
    self: Any,
    input_: Any,
    dim: int = -1,
    sizes: list[int] | None = None,
) -> Any:
    """``reduce_scatterv`` for ``CpuCommunicator`` on Gloo (all_reduce, take own slice)."""
    import torch.distributed as dist

    world_size = self.world_size
    if world_size == 1:
        return input_
    rank = self.rank_in_group
    d = dim + input_.dim() if dim < 0 else dim
    x = input_.movedim(d, 0).contiguous()
    if x.data_ptr() == input_.data_ptr():
        x = x.clone()  # never reduce into the caller's tensor
    total = x.shape[0]
    if sizes is None:
        if total % world_size:
            raise ValueError(f"reduce_scatterv: {total} rows not divisible by {world_size}")
        chunk = total // world_size
        offset = chunk * rank
    else:
        if len(sizes) != world_size:
            raise ValueError(f"reduce_scatterv: len(sizes)={len(sizes)} != {world_size}")
        if sum(sizes) != total:
            raise ValueError(f"reduce_scatterv: sum(sizes)={sum(sizes)} != {total}")
        chunk = sizes[rank]
        offset = sum(sizes[:rank])
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.device_group)
    out = x[offset : offset + chunk]
    return out.movedim(0, d).contiguous() if d != 0 else out.contiguous()


_all_gatherv.__dict__[_MARK] = True
_reduce_scatterv.__dict__[_MARK] = True


def request_amx_permission() -> str:
    """Ask the kernel for AMX tile-data permission in this process (see the module docstring).

    Returns ``granted``, ``unsupported`` (no AMX on this CPU, or a torch without the call) or
    ``refused`` (the kernel said no; vLLM's AMX kernels would then die of SIGILL).
    """
    import torch

    cpu = getattr(torch, "cpu", None)
    if not (hasattr(cpu, "_is_amx_tile_supported") and hasattr(cpu, "_init_amx")):
        return "unsupported"
    if not cpu._is_amx_tile_supported():
        return "unsupported"
    return "granted" if cpu._init_amx() else "refused"


def install() -> dict[str, str]:
    """Patch ``CpuCommunicator`` now (no env check). Returns ``{what: outcome}``.

    Method outcomes: ``installed``, ``already`` (ours, from an earlier call) or ``native``
    (vLLM defines the method on ``CpuCommunicator`` itself; left alone); ``amx``: see
    :func:`request_amx_permission`. Raises on import errors; :func:`register` is the
    never-raising wrapper.
    """
    from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator

    outcome: dict[str, str] = {"amx": request_amx_permission()}
    for name, impl in (("all_gatherv", _all_gatherv), ("reduce_scatterv", _reduce_scatterv)):
        current = CpuCommunicator.__dict__.get(name)
        if current is not None and getattr(current, _MARK, False):
            outcome[name] = "already"
        elif current is not None:
            outcome[name] = "native"
        else:
            setattr(CpuCommunicator, name, impl)
            outcome[name] = "installed"
    return outcome


def uninstall() -> None:
    """Remove our methods from ``CpuCommunicator`` (tests)."""
    try:
        from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator
    except Exception:  # noqa: BLE001 - vLLM missing or broken: nothing to undo
        return
    for name in ("all_gatherv", "reduce_scatterv"):
        current = CpuCommunicator.__dict__.get(name)
        if current is not None and getattr(current, _MARK, False):
            delattr(CpuCommunicator, name)


def register() -> None:
    """vLLM general-plugin entry point (``vllm.general_plugins``). Opt-in, idempotent, safe.

    Does nothing unless ``INSTRUMENTED_CORE_VLLM_CPU_DP`` is set (see the module docstring).
    Never raises: an error is logged once per process and vLLM is left as it was.
    """
    global _error_logged
    if not enabled_by_env():
        return
    try:
        outcome = install()
        if outcome["amx"] == "refused":
            logger.warning("instrumented_core CPU DP plugin: the kernel refused AMX permission; "
                           "use a float32 model or a CPU without AMX (pid %d)", os.getpid())
        if "installed" in outcome.values():
            logger.info("instrumented_core CPU DP plugin: CpuCommunicator %s (pid %d)",
                        outcome, os.getpid())
    except Exception as exc:  # noqa: BLE001 - never break vLLM
        if not _error_logged:
            _error_logged = True
            logger.error("instrumented_core CPU DP plugin inactive: %s: %s",
                         type(exc).__name__, exc)
