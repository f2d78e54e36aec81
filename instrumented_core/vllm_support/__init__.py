"""vLLM-side support: the CPU data-parallel plugin, the tiny local MoE model, the smoke run."""
